"""harness_daemon.py - running imdsd and its stand-ins, and reading what the daemon logs.

Fake runs fake_entra.py (the stand-in Entra) and drives its control endpoints; Daemon runs imdsd in
the background and run_once() to completion, both as the build variant says (harness_base.BINARY,
LABEL, VALGRIND, SCALE, read at call time) with sanitizer and valgrind output checked;
log_events()/log_ts() parse the daemon's key=value log lines.
"""
import calendar, http.client, json, os, re, signal, ssl, subprocess, sys, time

import harness_base as base
from harness_base import HERE, wait_for
from harness_http import request
from harness_netns import in_netns, unprivileged_prefix


# ---- the daemon's log -----------------------------------------------------------------------------

def log_events(text, event=None):
    """The daemon's key=value log lines as dicts (quoted values unquoted), optionally one event only."""
    out = []
    for line in text.splitlines():
        rec = {m.group(1): (m.group(2)[1:-1].replace('\\"', '"') if m.group(2).startswith('"') else m.group(2))
               for m in re.finditer(r'([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"|\S*)', line)}
        if rec and (event is None or rec.get("event") == event):
            rec["_line"] = line
            out.append(rec)
    return out


def log_ts(rec):
    """A log record's ts= (2026-11-28T12:00:00.123Z) as epoch seconds, or None."""
    m = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?Z", rec.get("ts", ""))
    if not m:
        return None
    secs = calendar.timegm(tuple(int(x) for x in m.groups()[:6]) + (0, 0, 0))
    return secs + (float("0." + m.group(7)) if m.group(7) else 0.0)


# ---- fake Entra -----------------------------------------------------------------------------------

class Fake:
    """A running fake_entra.py serving cert/key; the harness talks to its control endpoints."""

    def __init__(self, rundir, name, cert, key, netns=None, token_file=None, bind="127.0.0.1", extra=()):
        """netns: run inside that network namespace (a NetNS); token_file: the fake's default --token-file;
        bind: its listening address (a pod reaches 0.0.0.0 through its network's gateway); extra: more
        arguments (--path-prefix, --alt-cert/--alt-key)."""
        self.name, self.log = name, os.path.join(rundir, f"fake-{name}.jsonl")
        self._recs, self._offset = [], 0      # records() so far, and the bytes of the log they came from
        self.netns = netns
        ready = os.path.join(rundir, f"fake-{name}.port")
        self.stderr = open(os.path.join(rundir, f"fake-{name}.stderr"), "w")
        cmd = [sys.executable, os.path.join(HERE, "fake_entra.py"), "--cert", cert, "--key", key, "--port", "0",
               "--log", self.log, "--ready-file", ready, "--bind", bind] + \
            (["--token-file", token_file] if token_file else []) + list(extra)
        self.proc = subprocess.Popen((netns.prefix() if netns else []) + cmd,
                                     stdin=subprocess.DEVNULL, stdout=self.stderr, stderr=self.stderr)
        wait_for(lambda: os.path.exists(ready) or self.proc.poll() is not None, 10, f"fake {name}")
        assert self.proc.poll() is None, f"fake {name} exited: see {self.stderr.name}"
        self.port = int(open(ready).read())
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.tls.check_hostname, self.tls.verify_mode = False, ssl.CERT_NONE

    def _call(self, method, path, body=None):
        if self.netns is not None:
            return in_netns(self.netns, self._call_here, method, path, body)
        return self._call_here(method, path, body)

    def _call_here(self, method, path, body=None):
        c = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10, context=self.tls)
        try:
            c.request(method, path, body=json.dumps(body) if body is not None else None)
            r = c.getresponse()
            return json.loads(r.read())
        finally:
            c.close()

    def control(self, tenant, script=None, token_file=None, default=None):
        """script: the next answers; default: the tenant's behaviour from now on (instead of the
        one its name says)."""
        body = {"tenant": tenant}
        if script is not None:
            body["script"] = script
        if token_file is not None:
            body["token_file"] = token_file
        if default is not None:
            body["default"] = default
        r = self._call("POST", "/_control", body)
        assert r.get("ok"), f"fake {self.name} refused /_control {body}: {r}"

    def stats(self):
        return self._call("GET", "/_stats")

    def serve(self, which):
        """The certificate the fake's next TLS handshakes present: "main" or "alt" (--alt-cert)."""
        assert self._call("POST", "/_control", {"serve": which}).get("ok")

    def release(self, name):
        """Lets the token requests held by behaviour gate-<name> (and later ones) be answered."""
        assert self._call("POST", "/_control", {"release": name}).get("ok")

    def gated(self, name):
        """How many token requests are held at gate-<name> now."""
        return self._call("POST", "/_control", {"gated": name})["waiting"]

    def max_inflight(self, tenant):
        """The most token requests of tenant the fake was answering at the same time."""
        return self.stats()["max_inflight"].get(tenant, 0)

    def calls(self, tenant):
        return self.stats()["calls"].get(tenant, 0)

    def records(self, tenant=None):
        """The fake's record of every exchange (of tenant). Read while the fake may append to it, and
        incrementally: the file holds every exchange of this xdist worker (20 MB and more after the
        soak), and tests poll it."""
        for attempt in range(3):
            try:
                self._read_new()
                break
            except json.JSONDecodeError:
                # a read that overlapped an append came back torn once (a newline-terminated line
                # that was no record, bare-Debian run): read again; a record that stays bad is one
                if attempt == 2:
                    raise
                time.sleep(0.05)
        return [r for r in self._recs if tenant is None or r["tenant"] == tenant]

    def _read_new(self):
        """Parses the complete lines after self._offset; a line still being written (no newline
        yet) is not a record yet."""
        with open(self.log, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        pos = 0
        while True:
            nl = data.find(b"\n", pos)
            if nl < 0:
                return
            line = data[pos:nl]
            if line.strip():
                self._recs.append(json.loads(line))    # raises before the offset moves past it
            pos = nl + 1
            self._offset += len(line) + 1

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self.stderr.closed:
            self.stderr.close()


# ---- the daemon -----------------------------------------------------------------------------------

def base_env(extra=None):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    if base.LABEL == "asan":
        env["ASAN_OPTIONS"] = "abort_on_error=1:detect_leaks=1"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env.update(extra or {})
    return env


def command(args, vgdir, binary=None):
    cmd = [binary or base.BINARY] + list(args)
    if base.VALGRIND:
        cmd = ["valgrind", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite",
               "--track-fds=yes", f"--log-file={vgdir}/vg.%p"] + cmd
    return cmd


def check_tool_output(stderr_text, vg_log_text):
    """Fails on sanitizer reports, valgrind errors, or descriptors leaked at exit."""
    for bad in ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error"):
        assert bad not in stderr_text, f"sanitizer report in the daemon's stderr: {bad!r}"
    if vg_log_text is not None:
        m = re.search(r"ERROR SUMMARY: (\d+) errors", vg_log_text)
        assert m, "valgrind log has no ERROR SUMMARY"
        assert m.group(1) == "0", f"valgrind: {m.group(0)}"
        # --track-fds lists every non-std descriptor open at exit; valgrind's own log file shows up
        # as "<inherited from parent>", anything else the daemon opened and never closed.
        leaked = [m.group(1) for m in re.finditer(r"Open (?:file descriptor|AF_\w+ socket) (\d+): ?(.*)\n"
                                                  r"==\d+==\s+(.*)", vg_log_text)
                  if "inherited from parent" not in m.group(3)]
        assert not leaked, f"valgrind: descriptors {', '.join(leaked)} still open at exit"


def run_once(args, env=None, timeout=10, vgdir="/tmp", prefix=()):
    """Runs the binary to completion (config errors, --help), after the argv prefix (netns, setpriv).
    Returns (rc, stdout, stderr)."""
    before = set(os.listdir(vgdir)) if base.VALGRIND else set()
    p = subprocess.run(list(prefix) + command(args, vgdir), env=base_env(env), stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=timeout * base.SCALE, text=True, errors="replace")
    vg = None
    if base.VALGRIND:
        new = [f for f in os.listdir(vgdir) if f.startswith("vg.") and f not in before]
        vg = "".join(open(os.path.join(vgdir, f)).read() for f in new)
    check_tool_output(p.stderr, vg)
    return p.returncode, p.stdout, p.stderr


class Daemon:
    """imdsd running in the background with stderr in a file; start() waits for /healthz."""

    def __init__(self, args, env=None, workdir="/tmp", name="imdsd", port=None, netns=None, host="127.0.0.1",
                 unprivileged=False, prefix=(), binary=None):
        """netns: run inside that network namespace (a NetNS); host: where /healthz is polled;
        unprivileged: as uid/gid NOBODY with no capability at all and no_new_privs (a pod's sidecar);
        prefix: an argv that runs the command (systemd-socket-activate ..., qemu-aarch64-static; it
        must exec it or run it as its own process); binary: another imdsd than the variant's."""
        self.args, self.env, self.workdir, self.name = list(args), env, workdir, name
        self.prefix, self.binary = list(prefix), binary
        self.unprivileged = unprivileged
        self.port, self.netns, self.host = port, netns, host
        self.log_path = os.path.join(workdir, f"{name}.stderr")
        self.vgdir = os.path.join(workdir, f"{name}.vg")
        self.proc, self.stopped = None, False

    def start(self, wait=True, timeout=5):
        os.makedirs(self.vgdir, exist_ok=True)
        self.logf = open(self.log_path, "ab")
        prefix = self.netns.prefix() if self.netns is not None else []
        if self.unprivileged:
            os.chmod(self.vgdir, 0o777)   # valgrind writes its log as that user
            prefix += unprivileged_prefix()
        prefix += self.prefix
        # a session of its own, as systemd (setsid) and a container (a cgroup) give imdsd: the kernel's
        # autogroup then weighs its nice-19 handshake thread (worker.h) against imdsd's own loop only,
        # not against every process of the test run
        self.proc = subprocess.Popen(prefix + command(self.args, self.vgdir, self.binary), env=base_env(self.env),
                                     stdin=subprocess.DEVNULL, stdout=self.logf, stderr=self.logf,
                                     start_new_session=True)
        base.LIVE.append(self)
        if wait:
            self.wait_healthy(timeout, host=self.host)
        return self

    def wait_healthy(self, timeout=5, host="127.0.0.1"):
        def up():
            assert self.proc.poll() is None, f"daemon exited with {self.proc.returncode} during startup"
            try:
                return request(self.port, "/healthz", host=host, timeout=1, netns=self.netns).status == 200
            except OSError:
                return False
        wait_for(up, timeout, f"{self.name} /healthz on port {self.port}")

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def vg_log(self):
        if not base.VALGRIND:
            return None
        return "".join(open(os.path.join(self.vgdir, f), errors="replace").read()
                       for f in sorted(os.listdir(self.vgdir)))

    def stop(self, timeout=5):
        """SIGTERM; the daemon must exit 0 within timeout, with clean sanitizer/valgrind output."""
        if self.proc is None or self.stopped:
            return
        self.stopped = True
        died = self.proc.poll()
        if died is not None:
            self.logf.close()
            check_tool_output(self.log(), self.vg_log())
            how = f"signal {signal.Signals(-died).name}" if died < 0 else f"status {died}"
            raise AssertionError(f"{self.name} died during the test ({how})")
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout * base.SCALE)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not exit within {timeout * base.SCALE:.0f}s of SIGTERM")
        self.stop_seconds = time.monotonic() - t0
        self.logf.close()
        rc = self.proc.returncode
        check_tool_output(self.log(), self.vg_log())
        assert rc == 0, f"{self.name} exited with status {rc} after SIGTERM" + \
            (" (valgrind errors)" if base.VALGRIND and rc == 99 else "")

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
