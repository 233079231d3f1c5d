"""harness_netns.py - privilege prefixes (setpriv) and network namespaces for the integration tests.

unprivileged_prefix() and only_cap_prefix() are argv prefixes that run a command as a pod's sidecar or
init container would; NetNS is a named network namespace (root only) that stands for a pod or a VM,
and in_netns() runs Python code (a client's sockets) inside one.
"""
import atexit, ctypes, os, re, shutil, signal, subprocess, threading

NOBODY = 65532      # the image's user: daemons started with unprivileged=True run as it, no capability
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"


# ---- privilege prefixes -------------------------------------------------------------------------------

def unprivileged_prefix(uid=NOBODY):
    """argv prefix: uid/gid uid, no supplementary group, no capability (bounding set empty), no_new_privs."""
    return [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs"]


def only_cap_prefix(cap):
    """argv prefix: root, but with cap as its only capability (a container with drop ALL, add cap)."""
    return [SETPRIV, f"--inh-caps=-all,+{cap}", f"--bounding-set=-all,+{cap}", "--no-new-privs"]


# ---- network namespaces (root) ----------------------------------------------------------------------

IP = shutil.which("ip") or "/usr/sbin/ip"
NETNS_PREFIX = "imdsd-t"          # names are imdsd-t<pid of the worker>-<n>: unique, reapable
LIVE_NETNS = []
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(ns, fn, *args, **kw):
    """Calls fn(*args, **kw) on a thread that first joined network namespace ns (setns is per thread),
    so the sockets fn creates live there. Returns fn's value or raises its exception."""
    name = ns.name if isinstance(ns, NetNS) else ns
    box = {}

    def run():
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn(*args, **kw)
        except BaseException as e:  # noqa: B902 - handed to the caller
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


class NetNS:
    """A named network namespace with lo up (ip netns add). Requires root: no skip, a test that needs
    one fails without it. delete() (also at exit) kills what is still running inside, then removes it."""
    _n = 0

    def __init__(self, name):
        self.name = name

    @classmethod
    def create(cls):
        if os.geteuid() != 0:
            raise AssertionError("network namespace tests need root (ip netns add)")
        cls.reap_stale()
        cls._n += 1
        ns = cls(f"{NETNS_PREFIX}{os.getpid()}-{cls._n}")
        p = subprocess.run([IP, "netns", "add", ns.name], capture_output=True, text=True)
        assert p.returncode == 0, f"ip netns add {ns.name}: {p.stderr.strip()}"
        LIVE_NETNS.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    @staticmethod
    def reap_stale():
        """Removes namespaces named by this harness for runs whose process is gone (a killed run)."""
        p = subprocess.run([IP, "netns", "list"], capture_output=True, text=True)
        for line in p.stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            m = re.fullmatch(re.escape(NETNS_PREFIX) + r"(\d+)-\d+", name)
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                subprocess.run([IP, "netns", "delete", name], capture_output=True)

    def prefix(self):
        """argv prefix that runs a command inside the namespace."""
        return [IP, "netns", "exec", self.name]

    def ip(self, *args):
        p = subprocess.run(self.prefix() + [IP] + list(args), capture_output=True, text=True)
        assert p.returncode == 0, f"ip {' '.join(args)} in {self.name}: {p.stderr.strip()}"
        return p.stdout

    def pids(self):
        p = subprocess.run([IP, "netns", "pids", self.name], capture_output=True, text=True)
        return [int(x) for x in p.stdout.split() if x.isdigit()]

    def delete(self):
        if self not in LIVE_NETNS:
            return
        LIVE_NETNS.remove(self)
        for pid in self.pids():          # only ever processes this run started inside its own namespace
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p = subprocess.run([IP, "netns", "delete", self.name], capture_output=True, text=True)
        assert p.returncode == 0, f"ip netns delete {self.name}: {p.stderr.strip()}"

    def __repr__(self):
        return f"NetNS({self.name})"


@atexit.register
def _delete_live_netns():
    for ns in list(LIVE_NETNS):
        try:
            ns.delete()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
