#!/usr/bin/python3
"""check_systemd.py - imdsd under a real systemd as PID 1 (make check-systemd; make check-full runs it).

A Debian 12 root (debootstrap, cached in NSPAWN_CACHE, /var/tmp/imdsd-nspawn-cache) is booted with
systemd-nspawn, sharing the host's network; the stand-in Entra (tests/integration/fake_entra.py)
runs on the host. The test follows docs/deployment.md's systemd quick start: make install
DESTDIR=ROOT, the identity in /etc/default/imdsd, systemctl daemon-reload, systemctl enable --now
imdsd.service, a token at 127.0.0.1:8000. Then: STATUS= in systemctl show, systemctl reload, a
stalled loop (SIGSTOP) killed and restarted by the watchdog, socket activation on the first
connection (imdsd.socket and imdsd-health.socket), a token file readable only through
SupplementaryGroups=, and systemd-analyze security inside (exposure at most 1.5).
Needs root, debootstrap and systemd-nspawn (systemd-container), ports 8000 and 8001 free.
Without a cached root and a reachable mirror it says "skipped" and exits 0.
Ends with "check-systemd: N passed, N failed".
  NSPAWN_MIRROR=URL   the Debian mirror (default: the first of apt's sources)
  NSPAWN_KEEP=1       keeps the root and the container's state after the run, for a look
  NSPAWN_WATCHDOG_SEC=N  the watchdog check's WatchdogSec= (a drop-in; default 3), 0 for the unit's own
"""
import glob, hashlib, os, re, shutil, socket, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "integration"))
import harness  # noqa: E402

PACKAGES = "systemd,systemd-sysv,dbus,procps,libuv1,libmbedtls14,libmbedx509-1,libmbedcrypto7"
CACHE = os.environ.get("NSPAWN_CACHE", "/var/tmp/imdsd-nspawn-cache")
TAR = os.path.join(CACHE, "bookworm-%s.tar" % hashlib.sha256(PACKAGES.encode()).hexdigest()[:8])
TOKEN_IN_ROOT = "/srv/imdsd/azure-identity-token"
CA_IN_ROOT = "/etc/imdsd/test-ca.pem"
VAULT = "https://vault.azure.net"
PORT, HEALTH_PORT = 8000, 8001
WATCHDOG_TEST_SEC = int(os.environ.get("NSPAWN_WATCHDOG_SEC", "3"))

passed, failed = 0, 0


def say(msg):
    print(msg, flush=True)


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
    say(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    return ok


def finish(code=None):
    say(f"check-systemd: {passed} passed, {failed} failed")
    sys.exit(code if code is not None else (1 if failed else 0))


def skip(why):
    say(f"check-systemd: skipped: {why}")
    finish(0)


def mirror():
    if os.environ.get("NSPAWN_MIRROR"):
        return os.environ["NSPAWN_MIRROR"]
    for f in sorted(glob.glob("/etc/apt/sources.list") + glob.glob("/etc/apt/sources.list.d/*")):
        try:
            text = open(f).read()
        except OSError:
            continue
        for m in re.finditer(r"(?m)^(?:deb\s+(?:\[[^]]*\]\s+)?(\S+)|URIs:\s*(\S+))", text):
            uri = m.group(1) or m.group(2)
            if "security" not in uri and uri.startswith("http"):
                return uri
    return "http://deb.debian.org/debian"


def ensure_root_tar():
    """The debootstrap'd root as a tar, built once (a few minutes at most) and reused."""
    if os.path.exists(TAR):
        return
    os.makedirs(CACHE, exist_ok=True)
    build = tempfile.mkdtemp(prefix="root-", dir=CACHE)
    url = mirror()
    say(f"check-systemd: building the Debian 12 root with debootstrap from {url} (once; cached in {TAR})")
    t0 = time.monotonic()
    r = subprocess.run(["nice", "debootstrap", "--variant=minbase", "--include=" + PACKAGES, "bookworm", build, url],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        shutil.rmtree(build, ignore_errors=True)
        tail = " | ".join(r.stdout.strip().splitlines()[-3:])
        skip(f"debootstrap could not build the root from {url} (exit {r.returncode}: {tail})")
    # glibc finds "localhost" (the stand-in Entra's certificate name) in /etc/hosts, which minbase lacks
    with open(os.path.join(build, "etc/hosts"), "w") as f:
        f.write("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n")
    os.chmod(build, 0o755)   # mkdtemp's 0700 would become the root's / (no user but root gets in)
    subprocess.run(["tar", "-C", build, "-cf", TAR + ".tmp", "."], check=True)
    os.rename(TAR + ".tmp", TAR)
    shutil.rmtree(build)
    say(f"check-systemd: root built in {time.monotonic() - t0:.0f} s")


def port_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class Container:
    """ROOT booted by systemd-nspawn; sh() runs a command inside (nsenter into every namespace)."""

    def __init__(self, root, log):
        self.root, self.logf = root, open(log, "w")
        self.proc = subprocess.Popen(["systemd-nspawn", "-D", root, "-b", "--register=no", "--keep-unit",
                                      "--console=read-only"], stdin=subprocess.DEVNULL, stdout=self.logf,
                                     stderr=subprocess.STDOUT)
        self.pid = harness.wait_for(self._pid1, 30, "the container's systemd")

    def _pid1(self):
        assert self.proc.poll() is None, f"systemd-nspawn exited {self.proc.returncode}: see {self.logf.name}"
        for st in glob.glob("/proc/[0-9]*/status"):
            try:
                text = open(st).read()
            except OSError:
                continue
            ppid = re.search(r"(?m)^PPid:\s*(\d+)", text)
            nspid = re.search(r"(?m)^NSpid:\s*(.*)$", text)
            if ppid and int(ppid.group(1)) == self.proc.pid and nspid and nspid.group(1).split()[-1] == "1":
                pid = int(st.split("/")[2])
                # systemd itself (not yet nspawn's child before its exec), with its private bus up
                if "systemd" in text.split("\n", 1)[0] and os.path.exists(f"/proc/{pid}/root/run/systemd/private"):
                    return pid
        return None

    def sh(self, *cmd, check=False, timeout=60):
        r = subprocess.run(["nsenter", "-t", str(self.pid), "-a", *cmd], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stdout.strip()}")
        return r

    def show(self, unit, prop):
        return self.sh("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()

    def write(self, path, text, mode=0o644):
        p = self.root + path
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(text)
        os.chmod(p, mode)

    def journal(self, unit="imdsd.service", n=200):
        return self.sh("journalctl", "--no-pager", "-o", "cat", "-u", unit, "-n", str(n)).stdout

    def stop(self):
        if self.proc.poll() is None:
            self.sh("systemctl", "poweroff", "--no-block")
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                # the container's PID 1 first: killed, it takes every process of its namespace along
                # (systemd-nspawn killed alone leaves the container running)
                try:
                    os.kill(self.pid, 9)
                except ProcessLookupError:
                    pass
                self.proc.kill()
                self.proc.wait()
        self.logf.close()


def token(resource=VAULT, port=PORT):
    try:
        return harness.get_token(port, resource=resource, timeout=10)
    except OSError as e:
        return harness.Resp(0, [], str(e).encode())


def wait_token(what, resource=VAULT, timeout=20):
    """The first 200 within timeout, else the last answer."""
    deadline, r = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        r = token(resource)
        if r.status == 200:
            return r
        time.sleep(0.2)
    return r


def until(pred, timeout):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(0.2)


def main():
    t_start = time.monotonic()
    if os.geteuid() != 0:
        skip("needs root (debootstrap, systemd-nspawn)")
    for tool in ("debootstrap", "systemd-nspawn", "nsenter"):
        if not shutil.which(tool):
            skip(f"{tool} is not installed (make deps installs debootstrap and systemd-container)")
    for p in (PORT, HEALTH_PORT):
        if not port_free(p):
            check(f"port {p} free on the host (the container shares the host's network)", False,
                  "something listens there")
            finish()
    ensure_root_tar()

    run = tempfile.mkdtemp(prefix="imdsd-nspawn-run-", dir="/var/tmp")
    root = os.path.join(run, "root")
    os.mkdir(root)
    subprocess.run(["tar", "-C", root, "-xf", TAR], check=True)
    os.chmod(root, 0o755)
    fake = container = None
    try:
        # ---- make install DESTDIR=ROOT, as the quick start's first command
        r = subprocess.run(["nice", "make", "--no-print-directory", "-C", REPO, "install", f"DESTDIR={root}"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        say(r.stdout.strip())
        default = root + "/etc/default/imdsd"
        installed = r.returncode == 0 and all(os.path.exists(root + p) for p in (
            "/usr/local/sbin/imdsd", "/usr/local/lib/systemd/system/imdsd.service",
            "/usr/local/lib/systemd/system/imdsd.socket", "/usr/local/lib/systemd/system/imdsd-health.socket",
            "/usr/local/share/man/man8/imdsd.8")) and os.path.exists(default)
        if not check("make install DESTDIR=ROOT", installed, f"exit {r.returncode}"):
            finish()
        check("/etc/default/imdsd installed with mode 0600", os.stat(default).st_mode & 0o777 == 0o600,
              oct(os.stat(default).st_mode & 0o777))

        # ---- the stand-in Entra on the host, its CA and a service-account token inside the root
        pki = os.path.join(run, "pki")
        subprocess.run(["sh", os.path.join(HERE, "integration", "gen_certs.sh"), pki], check=True,
                       stdout=subprocess.DEVNULL)
        fake = harness.Fake(run, "good", os.path.join(pki, "leaf.pem"), os.path.join(pki, "leaf.key"))
        tenant = "ok.check-systemd"
        os.makedirs(os.path.dirname(root + CA_IN_ROOT), exist_ok=True)
        shutil.copy(os.path.join(pki, "ca.pem"), root + CA_IN_ROOT)
        os.chmod(root + CA_IN_ROOT, 0o644)
        os.makedirs(os.path.dirname(root + TOKEN_IN_ROOT), exist_ok=True)
        os.chmod(os.path.dirname(root + TOKEN_IN_ROOT), 0o755)
        with open(root + TOKEN_IN_ROOT, "w") as f:
            f.write(harness.make_jwt(lifetime=86400))
        os.chmod(root + TOKEN_IN_ROOT, 0o644)
        fake.control(tenant, token_file=root + TOKEN_IN_ROOT)

        # ---- "editor /etc/default/imdsd": the identity, the authority, the test's CA
        settings = {"AZURE_CLIENT_ID": harness.CLIENT_ID, "AZURE_TENANT_ID": tenant,
                    "AZURE_FEDERATED_TOKEN_FILE": TOKEN_IN_ROOT,
                    "AZURE_AUTHORITY_HOST": f"https://localhost:{fake.port}/", "IMDSD_CA_FILE": CA_IN_ROOT}
        lines = []
        for line in open(default).read().splitlines():
            k = line.split("=", 1)[0]
            lines.append(f"{k}={settings.pop(k)}" if k in settings else line)
        lines += [f"{k}={v}" for k, v in settings.items()]
        with open(default, "w") as f:
            f.write("\n".join(lines) + "\n")

        # ---- boot
        t_boot = time.monotonic()
        container = Container(root, os.path.join(run, "boot.log"))
        try:
            state = container.sh("systemctl", "is-system-running", "--wait", timeout=90).stdout.strip()
        except subprocess.TimeoutExpired:
            state = container.sh("systemctl", "is-system-running").stdout.strip() + " after 90 s"
        check("the container boots systemd", state in ("running", "degraded"),
              f"{state} in {time.monotonic() - t_boot:.1f} s")
        sh = container.sh

        # ---- the quick start: daemon-reload, enable --now, a token
        sh("systemctl", "daemon-reload", check=True)
        r = sh("systemctl", "enable", "--now", "imdsd.service")
        check("systemctl enable --now imdsd.service", r.returncode == 0, r.stdout.strip().replace("\n", " | "))
        r = wait_token("a token")
        ok = r.status == 200
        if ok:
            harness.assert_token_ok(r, resource=VAULT)
        check("a token from the service at 127.0.0.1:8000", ok,
              f"{r.status}, user {container.show('imdsd.service', 'User')!r}, "
              f"DynamicUser={container.show('imdsd.service', 'DynamicUser')}" if ok else repr(r))
        if not ok:
            say(container.journal(n=40))

        # ---- the TLS handshake's thread at nice 19 (worker.h): setpriority passes the syscall filter
        pid = container.show("imdsd.service", "MainPID")
        stats = container.sh("sh", "-c", f"cat /proc/{pid}/task/*/stat").stdout
        nices = [int(line.rsplit(")", 1)[1].split()[16]) for line in stats.splitlines() if ")" in line]
        check("the TLS handshake's thread at nice 19 in the unit's sandbox",
              nices.count(19) == 1 and "worker_priority" not in container.journal(),
              f"the threads' nice values {nices}")

        # ---- STATUS=
        status = until(lambda: (lambda s: s if s == "serving tokens" else None)(
            container.show("imdsd.service", "StatusText")), 5) or container.show("imdsd.service", "StatusText")
        check("STATUS= in systemctl show", status == "serving tokens", f"StatusText={status!r}")

        # ---- systemctl reload: SIGHUP, the token file re-read, the same process
        pid = container.show("imdsd.service", "MainPID")
        before = container.journal().count("token_file_reload")
        r = sh("systemctl", "reload", "imdsd.service")
        after = until(lambda: (lambda n: n if n > before else None)(container.journal().count("token_file_reload")), 5)
        same = container.show("imdsd.service", "MainPID")
        active = container.show("imdsd.service", "ActiveState")
        check("systemctl reload", r.returncode == 0 and after and same == pid and active == "active"
              and token().status == 200,
              f"exit {r.returncode}, token_file_reload events {before} -> {after}, MainPID {pid} -> {same}, {active}")

        # ---- a stalled loop: SIGSTOP; the watchdog kills (SIGABRT) and restarts it
        if WATCHDOG_TEST_SEC:
            container.write("/etc/systemd/system/imdsd.service.d/test-watchdog.conf",
                            f"# check_systemd.py: the unit's 30 s, shortened for the test\n"
                            f"[Service]\nWatchdogSec={WATCHDOG_TEST_SEC}s\n")
            sh("systemctl", "daemon-reload", check=True)
            sh("systemctl", "restart", "imdsd.service", check=True)
        watchdog = container.show("imdsd.service", "WatchdogUSec")   # "3s", "30s"
        pid = container.show("imdsd.service", "MainPID")
        restarts = int(container.show("imdsd.service", "NRestarts") or 0)
        wait_token("a token before the stall")
        t0 = time.monotonic()
        sh("systemctl", "kill", "--signal=SIGSTOP", "imdsd.service", check=True)
        newpid = until(lambda: (lambda p: p if p not in ("0", pid) and container.show(
            "imdsd.service", "ActiveState") == "active" else None)(container.show("imdsd.service", "MainPID")),
            (WATCHDOG_TEST_SEC or 30) + 30)
        took = time.monotonic() - t0
        jr = container.journal(n=60)
        nrestarts = int(container.show("imdsd.service", "NRestarts") or 0)
        r = wait_token("a token after the restart")
        check("a stalled loop restarted by the watchdog", bool(newpid) and "Watchdog timeout" in jr
              and nrestarts == restarts + 1 and r.status == 200,
              f"WatchdogSec={watchdog} ({'a drop-in' if WATCHDOG_TEST_SEC else 'the unit'}), "
              f"MainPID {pid} -> {newpid} after {took:.1f} s, "
              f"NRestarts {restarts} -> {nrestarts}, journal: 'Watchdog timeout' {'Watchdog timeout' in jr}, "
              f"'with signal SIGABRT' {'with signal SIGABRT' in jr}, "
              f"token {r.status}")
        if WATCHDOG_TEST_SEC:
            os.unlink(root + "/etc/systemd/system/imdsd.service.d/test-watchdog.conf")
            sh("systemctl", "daemon-reload", check=True)

        # ---- socket activation: the service stopped, the sockets enabled, the first connection starts it
        sh("systemctl", "disable", "--now", "imdsd.service", check=True)
        r = sh("systemctl", "enable", "--now", "imdsd.socket", "imdsd-health.socket")
        idle = container.show("imdsd.service", "ActiveState")
        hz = harness.request(HEALTH_PORT, "/healthz")
        started = container.show("imdsd.service", "ActiveState")
        r2 = wait_token("a token through imdsd.socket")
        on_health = harness.get_token(HEALTH_PORT, resource=VAULT)
        passed_fds = sorted(set(re.findall(r"listening addr=(\S+) serves=\S+ from=systemd fd=\d+ name=(\w+)",
                                           container.journal(n=40))), key=lambda x: x[1])
        check("socket activation on the first connection", r.returncode == 0 and idle == "inactive"
              and hz.status == 200 and started in ("active", "activating") and r2.status == 200
              and on_health.status == 404 and [n for _, n in passed_fds] == ["health", "tokens"],
              f"service {idle} with the sockets listening; GET :8001/healthz {hz.status} -> service {started}; "
              f"imdsd serves on systemd's {passed_fds}; token on :8000 {r2.status}, on :8001 {on_health.status}")

        # ---- a token file readable only through SupplementaryGroups=
        sh("groupadd", "--system", "imdsd-token", check=True)
        sh("chgrp", "imdsd-token", TOKEN_IN_ROOT, check=True)
        sh("chmod", "0640", TOKEN_IN_ROOT, check=True)
        sh("systemctl", "restart", "imdsd.service", check=True)
        refused = token()
        waiting = until(lambda: (lambda s: s if s.startswith("waiting for the service-account token") else None)(
            container.show("imdsd.service", "StatusText")), 5) or container.show("imdsd.service", "StatusText")
        container.write("/etc/systemd/system/imdsd.service.d/token-group.conf",
                        "[Service]\nSupplementaryGroups=imdsd-token\n")
        sh("systemctl", "daemon-reload", check=True)
        sh("systemctl", "restart", "imdsd.service", check=True)
        r = wait_token("a token with the group")
        check("a token file readable only through SupplementaryGroups=",
              refused.status != 200 and waiting.startswith("waiting for the service-account token")
              and r.status == 200,
              f"mode 0640 root:imdsd-token: {refused.status}, StatusText={waiting!r}; "
              f"with SupplementaryGroups=imdsd-token: {r.status}")

        # ---- systemd-analyze security inside, on the running unit
        r = sh("systemd-analyze", "security", "--no-pager", "imdsd.service")
        m = re.search(r"Overall exposure level for imdsd\.service: ([0-9.]+)", r.stdout)
        level = float(m.group(1)) if m else None
        check("systemd-analyze security imdsd.service <= 1.5", level is not None and level <= 1.5,
              f"{m.group(0) if m else r.stdout[-300:]}")
        if level is None or level > 1.5:
            say(r.stdout)

        # ---- the Azure Arc drop-in (systemd/imdsd-arc.conf), set up as its comments say
        for cmd in (["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "imdsd"],
                    ["groupadd", "imds-users"], ["useradd", "--create-home", "alice"], ["useradd", "--create-home", "bob"],
                    ["usermod", "-aG", "imds-users", "alice"],
                    ["install", "-d", "-m", "0755", "-o", "imdsd", "-g", "imds-users", "/var/opt/azcmagent/tokens"]):
            sh(*cmd, check=True)
        os.makedirs(root + "/etc/systemd/system/imdsd.service.d", exist_ok=True)
        shutil.copy(os.path.join(REPO, "systemd", "imdsd-arc.conf"), root + "/etc/systemd/system/imdsd.service.d/arc.conf")
        text = open(default).read()
        with open(default, "w") as f:
            f.write(re.sub(r"(?m)^IMDSD_ARGS=.*$", "IMDSD_ARGS=--listen 127.0.0.1:8000 --arc-key-dir "
                           "/var/opt/azcmagent/tokens --arc-key-group imds-users", text))
        sh("systemctl", "daemon-reload", check=True)
        sh("systemctl", "restart", "imdsd.service", check=True)
        challenge = token()   # one: each request without a key makes a key file (32 per user at most)
        realm = challenge.headers.get("www-authenticate", "")
        key_path = realm.split("=", 1)[1] if realm.startswith("Basic realm=") else ""
        st = os.stat(root + key_path) if key_path.startswith("/var/opt/azcmagent/tokens/") else None
        owner = sh("stat", "-c", "%U:%G %a", key_path).stdout.strip() if st else "-"
        alice = sh("runuser", "-u", "alice", "--", "cat", key_path) if st else None
        bob = sh("runuser", "-u", "bob", "--", "cat", key_path) if st else None
        r = harness.get_token(PORT, resource=VAULT, headers={"Metadata": "true", "Authorization": "Basic " + (
            alice.stdout.strip() if alice else "")}) if st else challenge
        jr = container.journal(n=60)
        if not check("the Arc drop-in: a challenge, its key file readable by the group only, a token", challenge.status == 401
              and st is not None and owner == "imdsd:imds-users 640" and alice.returncode == 0
              and bob.returncode != 0 and r.status == 200 and "arc_peer_uid_unavailable" not in jr,
              f"401 realm {key_path or realm!r} ({owner}); alice (imds-users) reads it: "
              f"{alice.returncode == 0 if alice else '-'}, bob: {bob.returncode == 0 if bob else '-'}; "
              f"with alice's key: {r.status}; per-user share: {'off' if 'arc_peer_uid_unavailable' in jr else 'on'}"):
            say(f"     first answer {challenge!r}, last {r!r}\n" + jr[-3000:])
        r = sh("systemd-analyze", "security", "--no-pager", "imdsd.service")
        m = re.search(r"Overall exposure level for imdsd\.service: ([0-9.]+)", r.stdout)
        check("systemd-analyze security with the Arc drop-in <= 1.5", m is not None and float(m.group(1)) <= 1.5,
              m.group(0) if m else r.stdout[-300:])
    except Exception as e:  # noqa: BLE001 - a broken step is a failure, the container still stops
        check("the test ran to its end", False, f"{type(e).__name__}: {e}")
        if container:
            say(container.journal(n=40))
    finally:
        if container:
            container.stop()
        if fake:
            fake.stop()
        if os.environ.get("NSPAWN_KEEP"):
            say(f"check-systemd: kept {run}")
        else:
            shutil.rmtree(run, ignore_errors=True)
    say(f"check-systemd: {time.monotonic() - t_start:.0f} s")
    finish()


if __name__ == "__main__":
    main()
