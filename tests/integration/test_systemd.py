"""systemd, natively: the notification protocol (READY=1, STATUS=, RELOADING=1, STOPPING=1), the
watchdog, socket activation, and the shipped units (systemd-analyze security and verify, make install
with the man page). No systemd runs here: each test plays its part. A datagram socket of the test's
stands for $NOTIFY_SOCKET, and systemd-socket-activate (from Debian's systemd package) binds the
sockets and execs imdsd with LISTEN_FDS, as a socket unit would."""
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import time

import pytest

import harness
from harness import assert_json_error, assert_token_ok, free_port, get_token, log_events, make_jwt, request, token_url

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ACTIVATE = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
UNITS = ("imdsd.service", "imdsd.socket", "imdsd-health.socket")


class NotifySocket:
    """systemd's end of $NOTIFY_SOCKET: path=None binds an abstract address ("@name")."""

    def __init__(self, path=None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            name = f"imdsd-test-{os.getpid()}-{harness.unique()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.sock.bind(path)
            self.address = path
        self.messages = []   # (time.monotonic() on arrival, {field: value})

    def env(self, **more):
        return dict(NOTIFY_SOCKET=self.address, **more)

    def receive(self, timeout):
        """The next message within timeout seconds (recorded in .messages), or None."""
        self.sock.settimeout(max(0.001, timeout))
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
        self.messages.append((time.monotonic(), fields))
        return fields

    def wait(self, pred, timeout, what):
        deadline = time.monotonic() + timeout * harness.SCALE
        while time.monotonic() < deadline:
            m = self.receive(deadline - time.monotonic())
            if m is not None and pred(m):
                return m
        raise AssertionError(f"no {what} on NOTIFY_SOCKET within {timeout * harness.SCALE:.1f}s; got "
                             f"{[m for _, m in self.messages][-8:]}")

    def drain(self, seconds):
        """Every message arriving in the next `seconds`."""
        out, end = [], time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return out
            m = self.receive(left)
            if m is not None:
                out.append(m)

    def close(self):
        self.sock.close()


def notify_socket(ctx, path=None):
    n = NotifySocket(path)
    ctx.cleanups.append(n.close)
    return n


def activate(ports, names, env=None, datagram=False):
    """argv prefix: systemd-socket-activate binding 127.0.0.1:PORT for each port, with those
    FileDescriptorName=s, passing the daemon's environment (it starts children with a clean one)."""
    argv = [ACTIVATE] + (["--datagram"] if datagram else [])
    for p in ports:
        argv += ["-l", f"127.0.0.1:{p}"]
    argv.append("--fdname=" + ":".join(names))
    for k in harness.base_env(env):
        argv += ["-E", k]
    return argv


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except ConnectionRefusedError:
        return True


# ---- socket activation ------------------------------------------------------------------------------

def test_socket_activation_serves_on_the_passed_sockets(ctx):
    """A token socket and a health socket from "systemd", instead of --listen: tokens on the first,
    only the probes on the second (404 for every token path), nothing on the --listen port."""
    tp, hp, flag_port = free_port(), free_port(), free_port()
    tenant, token = ctx.tenant(), ctx.token()
    args = ctx.daemon_args(tenant, token, flag_port)   # --listen names a port that must stay closed
    # the first connection (start()'s /healthz poll on tp) makes systemd-socket-activate exec imdsd
    d = ctx.daemon(tenant, token, args=args, port=tp, prefix=activate([tp, hp], ["tokens", "health"]))
    with open(f"/proc/{d.pid}/cmdline") as f:   # exec'd in place: LISTEN_PID is imdsd's (or valgrind's) pid
        assert harness.BINARY in f.read().split("\0")
    assert_token_ok(get_token(tp))
    assert request(hp, "/healthz").json == {"status": "ok"}
    r = request(hp, "/readyz")
    assert r.status == 200 and r.json["status"] == "ready", r
    for path in (token_url(), token_url(path="/Metadata/Identity/OAuth2/Token/")):
        assert_json_error(request(hp, path, {"Metadata": "true"}), 404, "not_found")
    assert request(tp, "/readyz").status == 200
    assert refused(flag_port), "imdsd listened on --listen although systemd passed sockets"
    assert ctx.fake.calls(tenant) == 1
    events = {(e["addr"], e["serves"], e.get("from"), e.get("name")) for e in log_events(d.log(), "listening")}
    assert events == {(f"127.0.0.1:{tp}", "tokens", "systemd", "tokens"),
                      (f"127.0.0.1:{hp}", "health", "systemd", "health")}, events


def test_socket_activation_refuses_what_it_cannot_serve(ctx):
    """A passed descriptor that is not a listening TCP socket, or malformed LISTEN_* variables: one line
    naming the variable, exit 2 (RestartPreventExitStatus=2). LISTEN_PID of another process: ignored."""
    tenant, token, flag_port = ctx.tenant(), ctx.token(), free_port()
    args = ctx.daemon_args(tenant, token, flag_port)
    in_place = ["sh", "-c", 'LISTEN_PID=$$ exec "$0" "$@" 3</dev/null']   # fd 3: a file, not a socket
    cases = [({"LISTEN_FDS": "1"}, "imdsd: LISTEN_FDS: descriptor 3 is not a socket\n"),
             ({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "tokens"},
              "imdsd: LISTEN_FDS: descriptor 3 (tokens) is not a socket\n"),
             ({"LISTEN_FDS": "x"}, "imdsd: LISTEN_FDS: 'x' is not a number\n"),
             ({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "tokens:health"},
              "imdsd: LISTEN_FDNAMES: 'tokens:health' names 2 sockets, LISTEN_FDS=1\n")]
    for env, want in cases:
        rc, out, err = harness.run_once(args, env, prefix=in_place, vgdir=ctx.tmp)
        assert (rc, err) == (2, want), (env, rc, err)
    # a UDP socket: systemd-socket-activate --datagram execs imdsd on the first datagram
    port = free_port()
    p = subprocess.Popen(activate([port], ["tokens"], datagram=True) + harness.command(args, ctx.tmp),
                         env=harness.base_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            def poked():   # datagrams sent before it binds are dropped: send until imdsd ran and exited
                u.sendto(b"x", ("127.0.0.1", port))
                return p.poll() is not None
            harness.wait_for(poked, 10, "imdsd to exit on a UDP socket", interval=0.1)
        _, err = p.communicate(timeout=10 * harness.SCALE)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    harness.check_tool_output(err, None)
    assert p.returncode == 2 and err.endswith(
        "imdsd: LISTEN_FDS: descriptor 3 (tokens) is not a TCP (stream, IPv4 or IPv6) socket\n"), err
    # variables meant for another process: --listen as usual
    d = ctx.daemon(tenant, token, args=args, port=flag_port, env={"LISTEN_PID": "1", "LISTEN_FDS": "1"})
    assert_token_ok(get_token(d.port))
    assert [e.get("from") for e in log_events(d.log(), "listening")] == [None]


# ---- Type=notify and the watchdog ------------------------------------------------------------------

def test_notify_ready_status_reload_stop(ctx):
    """READY=1 once listening (a connect right after it succeeds), STATUS= naming the missing token file,
    then "serving tokens" once it appears, RELOADING=1 + MONOTONIC_USEC= and READY=1 on SIGHUP,
    STOPPING=1 on SIGTERM, in that order (here on an abstract socket address)."""
    n = notify_socket(ctx)
    token = harness.KubeletToken(os.path.join(ctx.tmp, "late-token"), create=False)
    d = ctx.daemon(token=token, env=n.env(), wait=False)
    ready = n.wait(lambda m: m.get("READY") == "1", 5, "READY=1")
    assert "STATUS" in ready, ready
    assert request(d.port, "/healthz", timeout=2).status == 200   # no retry: it listens already
    want = f"waiting for the service-account token: missing ({token.path})"
    n.wait(lambda m: m.get("STATUS") == want, 5, f"STATUS={want}")
    token.rotate(make_jwt())
    n.wait(lambda m: m.get("STATUS") == "serving tokens", 5, "STATUS=serving tokens")
    assert_token_ok(get_token(d.port))
    os.kill(d.pid, signal.SIGHUP)
    reloading = n.wait(lambda m: m.get("RELOADING") == "1", 5, "RELOADING=1")
    # CLOCK_MONOTONIC in microseconds, as systemd 253+ wants it (Python's monotonic is the same clock)
    assert abs(int(reloading["MONOTONIC_USEC"]) / 1e6 - time.monotonic()) < 5 * harness.SCALE, reloading
    again = n.wait(lambda m: m.get("READY") == "1", 5, "READY=1 after the reload")
    assert again["STATUS"] == "serving tokens", again
    d.stop()
    n.wait(lambda m: m.get("STOPPING") == "1", 2, "STOPPING=1")
    states = [k for _, m in n.messages for k in ("READY", "RELOADING", "STOPPING") if m.get(k) == "1"]
    assert states == ["READY", "RELOADING", "READY", "STOPPING"], states
    assert not n.drain(0.2), "messages after the daemon exited"
    sd = log_events(d.log(), "sd_notify")
    assert len(sd) == 1 and sd[0]["socket"] == n.address and sd[0]["watchdog_ms"] == "0", sd


def test_watchdog_follows_the_loop(ctx):
    """WATCHDOG_USEC=200000: WATCHDOG=1 about every 100 ms, from the event loop: none while the process is
    stopped (SIGSTOP), again after SIGCONT. WATCHDOG_PID naming another process: no watchdog (here on a
    socket path)."""
    path = os.path.join(ctx.tmp, "notify")
    assert len(path) < 108, path
    n = notify_socket(ctx, path)
    d = ctx.daemon(env=n.env(WATCHDOG_USEC="200000"))
    n.wait(lambda m: m.get("WATCHDOG") == "1", 2, "the first WATCHDOG=1")
    t0 = len(n.messages)
    n.drain(1.5)
    beats = [t for t, m in n.messages[t0:] if m.get("WATCHDOG") == "1"]
    gaps = [b - a for a, b in zip(beats, beats[1:])]
    assert 10 <= len(beats) <= 18, f"{len(beats)} WATCHDOG=1 in 1.5 s"
    assert 0.08 <= statistics.median(gaps) <= 0.12, gaps
    os.kill(d.pid, signal.SIGSTOP)
    try:
        n.drain(0.1)   # what was sent before the stop took effect
        assert not [m for m in n.drain(0.6) if m.get("WATCHDOG")], "WATCHDOG=1 from a stopped process"
    finally:
        os.kill(d.pid, signal.SIGCONT)
    n.wait(lambda m: m.get("WATCHDOG") == "1", 0.5, "WATCHDOG=1 after SIGCONT")
    t1 = len(n.messages)
    n.drain(0.5)
    assert len([m for _, m in n.messages[t1:] if m.get("WATCHDOG")]) >= 3
    assert request(d.port, "/healthz").status == 200
    # the watchdog is for WATCHDOG_PID only
    other = notify_socket(ctx)
    ctx.daemon(env=other.env(WATCHDOG_USEC="200000", WATCHDOG_PID="1"))
    other.wait(lambda m: m.get("READY") == "1", 2, "READY=1")
    assert not [m for m in other.drain(0.5) if m.get("WATCHDOG")], "WATCHDOG=1 meant for another process"


# ---- the units, make install, the man page (once: they do not depend on the build variant) --------------

def test_service_unit_hardening():
    """systemd-analyze security --offline rates the shipped service's exposure at most 1.5."""
    p = subprocess.run([ANALYZE, "security", "--offline=true", os.path.join(ROOT, "systemd", "imdsd.service")],
                       capture_output=True, text=True, timeout=30)
    m = re.search(r"Overall exposure level for imdsd\.service: (\d+\.\d+)", p.stdout)
    assert m, p.stdout[-2000:] + p.stderr
    assert float(m.group(1)) <= 1.5, p.stdout


def test_make_install(tmp_path):
    """make install DESTDIR PREFIX=/usr/local: the binary, the units (ExecStart following PREFIX), the
    environment file (kept when present) and imdsd(8), with their modes; the page renders with man -l
    without a warning and shows every option of --help; systemd-analyze verify passes on the installed
    units (their man: reference included)."""
    binary = os.path.join(ROOT, "build", "imdsd")
    if not os.access(binary, os.X_OK):
        pytest.skip("build/imdsd is not built")
    dest = tmp_path / "dest"

    # a make of its own, not a sub-make of the make check that may run this test
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}

    def install():
        # -o build/imdsd: install what is built, never rebuild it under the other tests' feet; -B: the
        # man page from that binary's --help
        return subprocess.run(["make", "-s", "-B", "-o", "build/imdsd", "install", f"DESTDIR={dest}",
                               "PREFIX=/usr/local"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60)
    p = install()
    assert p.returncode == 0, p.stdout + p.stderr
    modes = {str(f.relative_to(dest)): oct(f.stat().st_mode & 0o7777) for f in dest.rglob("*") if f.is_file()}
    unitdir = "usr/local/lib/systemd/system"
    assert modes == {"usr/local/sbin/imdsd": "0o755", "usr/local/share/man/man8/imdsd.8": "0o644",
                     "etc/default/imdsd": "0o600", **{f"{unitdir}/{u}": "0o644" for u in UNITS}}, modes
    service = (dest / unitdir / "imdsd.service").read_text()
    assert "\nExecStart=/usr/local/sbin/imdsd $IMDSD_ARGS\n" in service
    # an existing /etc/default/imdsd is the admin's: a second install keeps it
    (dest / "etc/default/imdsd").write_text("AZURE_CLIENT_ID=mine\n")
    assert install().returncode == 0
    assert (dest / "etc/default/imdsd").read_text() == "AZURE_CLIENT_ID=mine\n"

    page = dest / "usr/local/share/man/man8/imdsd.8"
    r = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True, timeout=30,
                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "MANWIDTH": "100"})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith("IMDSD(8)") and "NAME\n       imdsd - " in r.stdout, r.stdout[:300]
    helptext = subprocess.run([binary, "--help"], capture_output=True, text=True, check=True).stdout
    options = set(re.findall(r"--[a-z][a-z-]*", helptext))
    assert len(options) >= 20, options
    missing = sorted(o for o in options if o not in r.stdout)
    assert not missing, f"options of --help not in the man page: {missing}"
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout.split()[1]
    assert f"imdsd {version}" in r.stdout

    # verify needs ExecStart to exist: the installed units, pointed at the installed binary
    vdir = tmp_path / "verify"
    vdir.mkdir()
    for u in UNITS:
        text = (dest / unitdir / u).read_text().replace("ExecStart=/usr/local/sbin/imdsd",
                                                         f"ExecStart={dest}/usr/local/sbin/imdsd")
        (vdir / u).write_text(text)
    v = subprocess.run([ANALYZE, "verify"] + [str(vdir / u) for u in UNITS], capture_output=True, text=True,
                       timeout=60, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C",
                                        "MANPATH": str(dest / "usr/local/share/man")})
    assert v.returncode == 0 and v.stdout == "" and v.stderr == "", v.stdout + v.stderr


def test_arc_dropin_hardening(tmp_path):
    """systemd/imdsd-arc.conf (the Azure Arc challenge on a VM: a fixed user, a group, a writable
    key directory, netlink for the challenges' users) on top of the shipped service: still at most
    1.5, and the drop-in is applied."""
    root = tmp_path / "root"
    unitdir = root / "etc/systemd/system"
    (unitdir / "imdsd.service.d").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "systemd", "imdsd.service"), unitdir / "imdsd.service")
    shutil.copy(os.path.join(ROOT, "systemd", "imdsd-arc.conf"), unitdir / "imdsd.service.d" / "arc.conf")
    p = subprocess.run([ANALYZE, "security", "--offline=true", f"--root={root}", "imdsd.service"],
                       capture_output=True, text=True, timeout=30)
    m = re.search(r"Overall exposure level for imdsd\.service: (\d+\.\d+)", p.stdout)
    assert m, p.stdout[-2000:] + p.stderr
    assert float(m.group(1)) <= 1.5, p.stdout
    assert re.search(r"✗ PrivateUsers=", p.stdout), "the drop-in was not applied"
    # added to the base unit's families: sock_diag names the user of each challenge
    assert re.search(r"✗ RestrictAddressFamilies=~AF_NETLINK", p.stdout), p.stdout
    assert re.search(r"✓ RestrictAddressFamilies=~AF_PACKET", p.stdout), p.stdout
    assert re.search(r"✓ User=/DynamicUser=\s+Service runs under a static non-root user", p.stdout), p.stdout
    # fchown alone back through ~@privileged: the key files get the users' group with it (without it,
    # EPERM and 503 for every challenge under a real systemd: tests/check_systemd.py)
    assert re.search(r"✗ SystemCallFilter=~@privileged .*\(e\.g\. fchown is allowed\)", p.stdout), p.stdout
