"""harness.py - helpers for the imdsd integration tests (stdlib only).

Configured once per run by run.py (BINARY, LABEL, VALGRIND, SCALE); tests receive a Ctx.
"""
import base64, hashlib, http.client, json, os, re, signal, socket, ssl, subprocess, sys, threading, time
import urllib.parse, uuid

HERE = os.path.dirname(os.path.abspath(__file__))
BINARY = None        # path of the imdsd binary under test
LABEL = ""           # "asan" enables sanitizer options and checks
VALGRIND = False     # run every daemon under valgrind
SCALE = 1.0          # timeout multiplier (about 10 under valgrind)
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
RESOURCE = "https://management.azure.com/"
TOKEN_PATH = "/metadata/identity/oauth2/token"
JSON_CT = "application/json; charset=utf-8"
LIVE = []           # every Daemon started, so run.py can kill them on Ctrl-C
IMDS_FIELDS = ["access_token", "client_id", "expires_in", "expires_on", "ext_expires_in", "not_before",
               "resource", "token_type"]


def free_port(family=socket.AF_INET, host="127.0.0.1"):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


# ---- HTTP helpers -------------------------------------------------------------------------------

class Resp:
    def __init__(self, status, headers, body):
        self.status, self.body = status, body
        self.headers = {k.lower(): v for k, v in headers}
        self.header_list = headers
        try:
            self.json = json.loads(body) if body else None
        except ValueError:
            self.json = None

    def __repr__(self):
        return f"<{self.status} {self.body[:300]!r}>"


def request(port, path, headers=None, method="GET", body=None, host="127.0.0.1", timeout=10, conn=None):
    """One request with http.client (on conn if given, so keep-alive can be tested). Returns Resp."""
    c = conn or http.client.HTTPConnection(host, port, timeout=timeout * SCALE)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return Resp(r.status, r.getheaders(), r.read())
    finally:
        if conn is None:
            c.close()


def token_url(resource=RESOURCE, client_id=None, api_version="2018-02-01", path=TOKEN_PATH, extra=""):
    q = []
    if api_version is not None:
        q.append("api-version=" + api_version)
    if resource is not None:
        q.append("resource=" + urllib.parse.quote(resource, safe=""))
    if client_id is not None:
        q.append("client_id=" + urllib.parse.quote(client_id, safe=""))
    return path + "?" + "&".join(q) + extra


def get_token(port, resource=RESOURCE, client_id=None, headers=None, conn=None, timeout=20, **kw):
    h = {"Metadata": "true"} if headers is None else headers
    return request(port, token_url(resource, client_id, **kw), h, conn=conn, timeout=timeout)


def raw_exchange(port, data, timeout=5, host="127.0.0.1", one_response=False):
    """Sends raw bytes, then reads until the peer closes or timeout (or, with one_response, until one
    complete response arrived). Returns (bytes received, closed): closed means EOF or reset was seen."""
    s = socket.create_connection((host, port), timeout=timeout * SCALE)
    got, closed = b"", False
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        deadline = time.monotonic() + timeout * SCALE
        while not closed and time.monotonic() < deadline:
            if one_response and complete_response(got):
                break
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                b = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not b:
                closed = True
                break
            got += b
    finally:
        s.close()
    return got, closed


def complete_response(data):
    r = parse_raw(data)
    return r is not None and len(r.body) >= int(r.headers.get("content-length", "0") or 0)


def parse_raw(data):
    """Parses the first HTTP response in data -> Resp (or None if there is none)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    m = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
    if not m:
        return None
    headers = [tuple(x.strip() for x in l.split(":", 1)) for l in lines[1:] if ":" in l]
    cl = dict((k.lower(), v) for k, v in headers).get("content-length", "")
    n = int(cl) if cl.isdigit() else len(rest)
    return Resp(int(m.group(1)), headers, rest[:n])


def assert_json_error(r, status, error=None, desc=None):
    """The IMDS error shape: status, JSON content type, string error + error_description."""
    assert r.status == status, f"want {status}, got {r!r}"
    assert r.headers.get("content-type") == JSON_CT, f"Content-Type {r.headers.get('content-type')!r}"
    assert isinstance(r.json, dict), f"error body is not a JSON object: {r.body[:200]!r}"
    assert isinstance(r.json.get("error"), str) and r.json["error"], f"no string 'error': {r.json}"
    assert isinstance(r.json.get("error_description"), str), f"no string 'error_description': {r.json}"
    assert "access_token" not in r.json, "error body carries an access_token"
    if error is not None:
        assert r.json["error"] == error, f"error {r.json['error']!r}, want {error!r}"
    if desc is not None:
        assert desc in r.json["error_description"], f"{desc!r} not in {r.json['error_description']!r}"
    return r.json


def assert_token_ok(r, resource=RESOURCE, client_id=CLIENT_ID):
    """The IMDS 200 shape: every field a string, integers where integers are expected."""
    assert r.status == 200, f"want 200, got {r!r}"
    assert r.headers.get("content-type") == JSON_CT, f"Content-Type {r.headers.get('content-type')!r}"
    j = r.json
    assert isinstance(j, dict), f"body is not JSON: {r.body[:200]!r}"
    assert sorted(j) == IMDS_FIELDS, f"fields {sorted(j)}, want {IMDS_FIELDS}"
    for k, v in j.items():
        assert isinstance(v, str), f"{k} is {type(v).__name__} {v!r}, not a string"
    for k in ("expires_in", "expires_on", "ext_expires_in", "not_before"):
        assert re.fullmatch(r"[0-9]+", j[k]), f"{k}={j[k]!r} is not a decimal integer string"
    assert j["token_type"] == "Bearer", j["token_type"]
    assert j["resource"] == resource, f"resource {j['resource']!r}, want {resource!r}"
    if client_id is not None:
        assert j["client_id"] == client_id, f"client_id {j['client_id']!r}, want {client_id!r}"
    assert j["access_token"], "empty access_token"
    return j


# ---- projected service-account token ------------------------------------------------------------

def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(lifetime=3600, sub="system:serviceaccount:default:workload"):
    now = int(time.time())
    head = {"alg": "RS256", "kid": b64url(os.urandom(12))}
    claims = {"aud": ["api://AzureADTokenExchange"], "exp": now + lifetime, "iat": now, "nbf": now,
              "iss": "https://oidc.prod-aks.azure.com/00000000-1111-2222-3333-444444444444/", "sub": sub,
              "jti": str(uuid.uuid4()),
              "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "workload", "uid": str(uuid.uuid4())},
                                "pod": {"name": "workload-7d9c", "uid": str(uuid.uuid4())}}}
    enc = lambda o: b64url(json.dumps(o, separators=(",", ":")).encode())
    return f"{enc(head)}.{enc(claims)}.{b64url(os.urandom(256))}"


class ProjectedToken:
    """A kubelet-style projected volume: DIR/..<ts>/NAME, DIR/..data -> ..<ts>, DIR/NAME -> ..data/NAME."""
    NAME = "azure-identity-token"

    def __init__(self, root, content=None, newline=False):
        self.root, self.gen = root, 0
        os.makedirs(root, exist_ok=True)
        self.path = os.path.join(root, self.NAME)
        self.content = None
        self.rotate(content, newline=newline)
        os.symlink(os.path.join("..data", self.NAME), self.path)

    def rotate(self, content=None, newline=False):
        """Atomic writer: new timestamped dir, ..data_tmp symlink renamed over ..data, old dir removed."""
        self.gen += 1
        content = content if content is not None else make_jwt()
        ts = time.strftime("..%Y_%m_%d_%H_%M_%S", time.gmtime()) + f".{self.gen}{os.getpid() % 1000:03d}"
        d = os.path.join(self.root, ts)
        os.mkdir(d)
        with open(os.path.join(d, self.NAME), "w") as f:
            f.write(content + ("\n" if newline else ""))
        old = os.readlink(os.path.join(self.root, "..data")) if os.path.islink(os.path.join(self.root, "..data")) else None
        tmp = os.path.join(self.root, "..data_tmp")
        os.symlink(ts, tmp)
        os.rename(tmp, os.path.join(self.root, "..data"))
        if old:
            for f in os.listdir(os.path.join(self.root, old)):
                os.unlink(os.path.join(self.root, old, f))
            os.rmdir(os.path.join(self.root, old))
        self.content = content
        return content

    @property
    def sha256(self):
        return hashlib.sha256(self.content.encode()).hexdigest()


# ---- fake Entra -----------------------------------------------------------------------------------

class Fake:
    """A running fake_entra.py serving cert/key; the harness talks to its control endpoints."""

    def __init__(self, rundir, name, cert, key):
        self.name, self.log = name, os.path.join(rundir, f"fake-{name}.jsonl")
        ready = os.path.join(rundir, f"fake-{name}.port")
        self.stderr = open(os.path.join(rundir, f"fake-{name}.stderr"), "w")
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_entra.py"), "--cert", cert,
                                      "--key", key, "--port", "0", "--log", self.log, "--ready-file", ready],
                                     stdin=subprocess.DEVNULL, stdout=self.stderr, stderr=self.stderr)
        wait_for(lambda: os.path.exists(ready) or self.proc.poll() is not None, 10, f"fake {name}")
        assert self.proc.poll() is None, f"fake {name} exited: see {self.stderr.name}"
        self.port = int(open(ready).read())
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.tls.check_hostname, self.tls.verify_mode = False, ssl.CERT_NONE

    def _call(self, method, path, body=None):
        c = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10, context=self.tls)
        try:
            c.request(method, path, body=json.dumps(body) if body is not None else None)
            r = c.getresponse()
            return json.loads(r.read())
        finally:
            c.close()

    def control(self, tenant, script=None, token_file=None):
        body = {"tenant": tenant}
        if script is not None:
            body["script"] = script
        if token_file is not None:
            body["token_file"] = token_file
        self._call("POST", "/_control", body)

    def stats(self):
        return self._call("GET", "/_stats")

    def calls(self, tenant):
        return self.stats()["calls"].get(tenant, 0)

    def records(self, tenant=None):
        out = []
        with open(self.log) as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    if tenant is None or rec["tenant"] == tenant:
                        out.append(rec)
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


# ---- the daemon -----------------------------------------------------------------------------------

def base_env(extra=None):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    if LABEL == "asan":
        env["ASAN_OPTIONS"] = "abort_on_error=1:detect_leaks=1"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env.update(extra or {})
    return env


def command(args, vgdir):
    cmd = [BINARY] + list(args)
    if VALGRIND:
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


def run_once(args, env=None, timeout=10, vgdir="/tmp"):
    """Runs the binary to completion (config errors, --help). Returns (rc, stdout, stderr)."""
    before = set(os.listdir(vgdir)) if VALGRIND else set()
    p = subprocess.run(command(args, vgdir), env=base_env(env), stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=timeout * SCALE, text=True, errors="replace")
    vg = None
    if VALGRIND:
        new = [f for f in os.listdir(vgdir) if f.startswith("vg.") and f not in before]
        vg = "".join(open(os.path.join(vgdir, f)).read() for f in new)
    check_tool_output(p.stderr, vg)
    return p.returncode, p.stdout, p.stderr


class Daemon:
    """imdsd running in the background with stderr in a file; start() waits for /healthz."""

    def __init__(self, args, env=None, workdir="/tmp", name="imdsd", port=None):
        self.args, self.env, self.workdir, self.name = list(args), env, workdir, name
        self.port = port
        self.log_path = os.path.join(workdir, f"{name}.stderr")
        self.vgdir = os.path.join(workdir, f"{name}.vg")
        self.proc, self.stopped = None, False

    def start(self, wait=True, timeout=5):
        os.makedirs(self.vgdir, exist_ok=True)
        self.logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(command(self.args, self.vgdir), env=base_env(self.env),
                                     stdin=subprocess.DEVNULL, stdout=self.logf, stderr=self.logf)
        LIVE.append(self)
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout=5, host="127.0.0.1"):
        def up():
            assert self.proc.poll() is None, f"daemon exited with {self.proc.returncode} during startup"
            try:
                return request(self.port, "/healthz", host=host, timeout=1).status == 200
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
        if not VALGRIND:
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
            self.proc.wait(timeout * SCALE)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not exit within {timeout * SCALE:.0f}s of SIGTERM")
        self.stop_seconds = time.monotonic() - t0
        self.logf.close()
        rc = self.proc.returncode
        check_tool_output(self.log(), self.vg_log())
        assert rc == 0, f"{self.name} exited with status {rc} after SIGTERM" + \
            (" (valgrind errors)" if VALGRIND and rc == 99 else "")

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ---- per-test context -------------------------------------------------------------------------------

class Skip(Exception):
    pass


class Ctx:
    """Fresh state for one test: a temp dir, unique tenants, daemons that are stopped and checked."""

    def __init__(self, name, tmp, certs, fakes):
        self.name, self.tmp, self.certs = name, tmp, certs
        self.fake, self.fake_wronghost, self.fake_rogue = fakes["good"], fakes["wronghost"], fakes["rogue"]
        self.daemons, self.n = [], 0
        self.scale = SCALE

    def tenant(self, behaviour="ok"):
        """A tenant unique to this test whose default behaviour at the fake is behaviour."""
        self.n += 1
        return f"{behaviour}.{self.name.replace('_', '-')}-{self.n}"

    def token(self, content=None, newline=False):
        self.n += 1
        return ProjectedToken(os.path.join(self.tmp, f"sa-token-{self.n}"), content, newline)

    def daemon_args(self, tenant=None, token=None, port=None, fake=None, client_id=CLIENT_ID,
                    extra=(), log_level="debug"):
        fake = fake or self.fake
        args = ["--listen", f"127.0.0.1:{port}", "--authority-host", f"https://localhost:{fake.port}/",
                "--ca-file", self.certs["ca.pem"]]
        if client_id is not None:
            args += ["--client-id", client_id]
        if tenant is not None:
            args += ["--tenant-id", tenant]
        if token is not None:
            args += ["--token-file", token.path]
        if log_level:
            args += ["--log-level", log_level]
        return args + list(extra)

    def daemon(self, tenant=None, token=None, extra=(), env=None, fake=None, client_id=CLIENT_ID,
               args=None, start=True, port=None, log_level="debug", wait=True):
        """Starts imdsd against the fake; returns the Daemon (d.port, d.tenant, d.token)."""
        tenant = tenant or self.tenant("ok")
        token = token or self.token()
        port = port or free_port()
        if args is None:
            args = self.daemon_args(tenant, token, port, fake, client_id, extra, log_level)
        self.n += 1
        d = Daemon(args, env, self.tmp, f"imdsd-{self.n}", port)
        d.tenant, d.token = tenant, token
        (fake or self.fake).control(tenant, token_file=token.path)
        self.daemons.append(d)
        if start:
            d.start(wait=wait)
        return d

    def run(self, args, env=None, timeout=10):
        return run_once(args, env, timeout, self.tmp)

    def finish(self):
        """Stops every daemon this test started; returns the reasons any did not stop cleanly."""
        errors = []
        for d in self.daemons:
            try:
                d.stop()
            except AssertionError as e:
                errors.append(str(e))
            finally:
                d.kill()
        return errors

    def log_tail(self, n=15):
        out = []
        for d in self.daemons:
            lines = d.log().splitlines()[-n:]
            if lines:
                out.append(f"  --- {d.name} stderr (last {len(lines)} lines) ---")
                out += ["  " + l for l in lines]
            vg = d.vg_log()
            if vg and "ERROR SUMMARY: 0 errors" not in vg:
                out.append(f"  --- {d.name} valgrind ---")
                out += ["  " + l for l in vg.splitlines()[-40:]]
        return "\n".join(out)


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
