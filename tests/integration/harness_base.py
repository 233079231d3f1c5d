"""harness_base.py - the build variant under test, the shared constants and small helpers.

The variant state (BINARY, LABEL, VALGRIND, SCALE) lives here and only here: conftest.py sets it per
test (through the harness facade, which forwards to this module), and every other harness module
reads it as harness_base.NAME at call time, never as a copy taken at import.
"""
import atexit, os, shutil, socket, tempfile, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
BINARY = None        # path of the imdsd binary under test
LABEL = ""           # "asan" enables sanitizer options and checks
VALGRIND = False     # run every daemon under valgrind
SCALE = 1.0          # timeout multiplier (about 10 under valgrind)
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
RESOURCE = "https://management.azure.com/"
TOKEN_PATH = "/metadata/identity/oauth2/token"
JSON_CT = "application/json; charset=utf-8"
LIVE = []           # every Daemon started, so conftest.py can kill them at the end


def reachable_by_all(path):
    """path itself when every user can read it (and run it, if it is a program), else a copy that
    every user can: a checkout under /root (mode 0700, where a newcomer who is root clones it) is out
    of reach of the unprivileged users the tests run daemons and SDK clients as. One copy per
    process, removed at exit."""
    path = os.path.abspath(path)
    need = 0o005 if os.access(path, os.X_OK) else 0o004
    ok, d = (os.stat(path).st_mode & need) == need, os.path.dirname(path)
    while ok and d != "/":
        ok, d = bool(os.stat(d).st_mode & 0o001), os.path.dirname(d)
    if ok:
        return path
    if path not in _copies:
        global _copy_dir
        if _copy_dir is None:
            _copy_dir = tempfile.mkdtemp(prefix="imdsd-it-shared-")
            os.chmod(_copy_dir, 0o755)
            atexit.register(shutil.rmtree, _copy_dir, True)
        sub = os.path.join(_copy_dir, str(len(_copies)))
        os.mkdir(sub, 0o755)
        _copies[path] = shutil.copy2(path, sub)
        os.chmod(_copies[path], 0o755 if need == 0o005 else 0o644)
    return _copies[path]


_copies, _copy_dir = {}, None


# Ports for daemons come from a range below the kernel's ephemeral ports (32768-60999), one range per
# pytest-xdist worker, handed out in turn: a port picked here is never also the kernel's pick for a
# client socket or another worker's daemon in the moment before the daemon binds it.
PORT_BASE, PORT_SPAN = 10000, 2000
_port_next = None


def free_port(family=socket.AF_INET, host="127.0.0.1"):
    global _port_next
    w = os.environ.get("PYTEST_XDIST_WORKER", "")
    slot = int(w[2:]) + 1 if w.startswith("gw") and w[2:].isdigit() else 0
    lo = PORT_BASE + slot * PORT_SPAN
    if _port_next is None:
        _port_next = lo + os.getpid() % PORT_SPAN
    for _ in range(PORT_SPAN):
        port = lo + (_port_next - lo) % PORT_SPAN
        _port_next = port + 1
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {lo}..{lo + PORT_SPAN - 1}")


_unique = 0


def unique():
    """A number not used before in this process (names at the shared stand-in Entra)."""
    global _unique
    _unique += 1
    return _unique


def cpu_seconds(pid):
    """CPU time (user + system) process pid has used, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_nices(pid):
    """{thread id: nice value} of process pid's threads (/proc/PID/task/TID/stat, field 19)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                out[int(tid)] = int(f.read().rsplit(")", 1)[1].split()[16])
        except (OSError, IndexError, ValueError):
            pass     # the thread ended meanwhile
    return out


def wait_for(pred, timeout, what, interval=0.05):
    """Polls pred() until it returns a truthy value; fails the test after timeout * SCALE seconds."""
    deadline = time.monotonic() + timeout * SCALE
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout * SCALE:.0f}s waiting for {what}")
        time.sleep(interval)


# ---- skipping, threads ------------------------------------------------------------------------------

try:
    import pytest
    Skip = pytest.skip.Exception   # raise Skip("why"): the test is reported as skipped
except ImportError:                # the bench imports this module without pytest
    class Skip(Exception):
        pass


def concurrently(n, fn, timeout=30):
    """Runs fn(i) in n threads released together by a barrier; returns results (exceptions as values)."""
    barrier, results = threading.Barrier(n), [None] * n

    def worker(i):
        try:
            barrier.wait(timeout * SCALE)
            results[i] = fn(i)
        except BaseException as e:  # noqa: B902 - reported to the caller as a value
            results[i] = e
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * SCALE)
    return results
