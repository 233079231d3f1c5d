"""harness.py - helpers for the imdsd integration tests (stdlib only).

Configured per test by conftest.py for the build variant (BINARY, LABEL, VALGRIND, SCALE); tests receive a Ctx.
"""
import atexit, base64, ctypes, hashlib, http.client, json, os, re, shutil, signal, socket, ssl, subprocess, sys
import tempfile, threading, time, urllib.parse, uuid

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
NOBODY = 65532      # the image's user: daemons started with unprivileged=True run as it, no capability
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
IMDS_FIELDS = ["access_token", "client_id", "expires_in", "expires_on", "ext_expires_in", "not_before",
               "resource", "token_type"]


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


def request(port, path, headers=None, method="GET", body=None, host="127.0.0.1", timeout=10, conn=None,
            netns=None):
    """One request with http.client (on conn if given, so keep-alive can be tested). Returns Resp.
    With netns (a NetNS or its name), the request is made from inside that network namespace."""
    if netns is not None:
        return in_netns(netns, request, port, path, headers, method, body, host, timeout, conn)
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


def get_token(port, resource=RESOURCE, client_id=None, headers=None, conn=None, timeout=20, netns=None, **kw):
    h = {"Metadata": "true"} if headers is None else headers
    return request(port, token_url(resource, client_id, **kw), h, conn=conn, timeout=timeout, netns=netns)


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


def raw_get(path=None):
    """A complete GET request for path (default: the token for RESOURCE) with Metadata: true, as bytes."""
    return f"GET {path or token_url()} HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: true\r\n\r\n".encode()


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


def split_responses(data):
    """All complete HTTP responses in data, in order."""
    out = []
    while data:
        r = parse_raw(data)
        if r is None:
            break
        head = data.index(b"\r\n\r\n") + 4
        n = int(r.headers.get("content-length", "0"))
        if len(data) < head + n:
            break
        out.append(r)
        data = data[head + n:]
    return out, data


def read_responses(sock, count, timeout):
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        rs, _ = split_responses(data)
        if len(rs) >= count:
            return rs, data
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            b = sock.recv(65536)
        except socket.timeout:
            break
        if not b:
            break
        data += b
    return split_responses(data)[0], data


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


# ---- token-file life cycle: the kubelet's atomic writer, JWT variants, daemon log events ---------

def make_jwt_with(lifetime=3600, drop=(), payload=None, **claims):
    """A projected-token-shaped JWS with claims overridden (claims=...), removed (drop=...), or with
    payload (bytes) as the raw decoded payload segment. Returns (jwt, claims dict or None)."""
    now = int(time.time())
    c = {"aud": ["api://AzureADTokenExchange"], "exp": now + lifetime, "iat": now, "nbf": now,
         "iss": "https://oidc.prod-aks.azure.com/00000000-1111-2222-3333-444444444444/",
         "sub": "system:serviceaccount:default:workload", "jti": str(uuid.uuid4()),
         "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "workload", "uid": str(uuid.uuid4())},
                           "pod": {"name": "workload-7d9c", "uid": str(uuid.uuid4())}}}
    c.update(claims)
    for k in drop:
        c.pop(k, None)
    head = b64url(json.dumps({"alg": "RS256", "kid": b64url(os.urandom(12))}, separators=(",", ":")).encode())
    body = payload if payload is not None else json.dumps(c, separators=(",", ":")).encode()
    return f"{head}.{b64url(body)}.{b64url(os.urandom(256))}", (None if payload is not None else c)


def fingerprint(content):
    """The daemon's 12-hex fingerprint of a (whitespace-trimmed) token: the first 6 bytes of SHA-256."""
    if isinstance(content, str):
        content = content.encode()
    return hashlib.sha256(content.strip(b" \t\r\n")).hexdigest()[:12]


class KubeletToken:
    """A projected service-account token volume written exactly as the kubelet's AtomicWriter.Write
    (kubernetes pkg/volume/util/atomic_writer.go) does it, so inotify sees the real event sequence:
      ROOT/..2026_11_28_12_00_00.<rand>/   MkdirTemp, then chmod 0755, then the payload inside
      ROOT/..data_tmp -> ..2026_...<rand>  symlink, then rename("..data_tmp", "..data")
      user-visible symlinks (created once, never changed), then RemoveAll of the old timestamped dir.
    Layouts (imds-protocol.md section 4):
      nested=False (AZWI <= v1.5): ROOT/azure-identity-token -> ..data/azure-identity-token
      nested=True  (AZWI v1.6):    ROOT/token -> ..data/token; the file is ROOT/token/azure-identity-token
    .path is what AZURE_FEDERATED_TOKEN_FILE names. With create=False nothing (not even ROOT) exists
    until the first rotate(). rotate() accepts the same arguments as ProjectedToken.rotate, bytes, or
    KubeletToken.DIRECTORY (the payload path becomes a directory). Every rotation is recorded in
    .rotations as dict(gen, sha256, fp, t_before, t_renamed, t_done): time.time() stamps just before
    and just after the rename (comparable with fake_entra's "time") and after the old dir is gone."""
    NAME = "azure-identity-token"
    DIRECTORY = object()

    def __init__(self, root, content=None, newline=False, nested=False, create=True, mode=0o644):
        self.root, self.nested, self.mode = root, nested, mode
        self.rel = os.path.join("token", self.NAME) if nested else self.NAME
        self.path = os.path.join(root, self.rel)
        self.content, self.gen, self.rotations = None, 0, []
        if create:
            self.rotate(content, newline=newline)

    def rotate(self, content=None, newline=False):
        content = make_jwt() if content is None else content
        os.makedirs(self.root, exist_ok=True)   # the volume's mount point
        data = os.path.join(self.root, "..data")
        old = os.readlink(data) if os.path.islink(data) else None
        import shutil, tempfile   # local: keeps this block independent of the header's imports
        ts_dir = tempfile.mkdtemp(prefix=time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()), dir=self.root)
        os.chmod(ts_dir, 0o755)
        target = os.path.join(ts_dir, self.rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if content is self.DIRECTORY:
            os.mkdir(target)
            raw = None
        else:
            raw = content.encode() if isinstance(content, str) else bytes(content)
            raw += b"\n" if newline else b""
            with open(target, "wb") as f:
                f.write(raw)
            os.chmod(target, self.mode)
        tmp = os.path.join(self.root, "..data_tmp")
        os.symlink(os.path.basename(ts_dir), tmp)
        t_before = time.time()
        os.rename(tmp, data)
        t_renamed = time.time()
        top = self.rel.split(os.sep)[0]
        if not os.path.islink(os.path.join(self.root, top)):
            os.symlink(os.path.join("..data", top), os.path.join(self.root, top))
        if old:
            shutil.rmtree(os.path.join(self.root, old))
        self.gen += 1
        self.content = None if raw is None else raw.decode(errors="replace")
        rec = {"gen": self.gen, "sha256": None if raw is None else hashlib.sha256(raw.strip(b" \t\r\n")).hexdigest(),
               "fp": None if raw is None else fingerprint(raw), "t_before": t_before, "t_renamed": t_renamed,
               "t_done": time.time()}
        self.rotations.append(rec)
        return content

    def remove_data(self):
        """Takes ..data away (the visible symlink then dangles): the token file is missing."""
        import shutil
        data = os.path.join(self.root, "..data")
        old = os.readlink(data)
        os.unlink(data)
        shutil.rmtree(os.path.join(self.root, old))

    @property
    def sha256(self):
        return hashlib.sha256(self.content.strip().encode()).hexdigest()


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
    import calendar
    secs = calendar.timegm(tuple(int(x) for x in m.groups()[:6]) + (0, 0, 0))
    return secs + (float("0." + m.group(7)) if m.group(7) else 0.0)


# ---- fake Entra -----------------------------------------------------------------------------------

class Fake:
    """A running fake_entra.py serving cert/key; the harness talks to its control endpoints."""

    def __init__(self, rundir, name, cert, key, netns=None, token_file=None, bind="127.0.0.1"):
        """netns: run inside that network namespace (a NetNS); token_file: the fake's default --token-file;
        bind: its listening address (a pod reaches 0.0.0.0 through its network's gateway)."""
        self.name, self.log = name, os.path.join(rundir, f"fake-{name}.jsonl")
        self.netns = netns
        ready = os.path.join(rundir, f"fake-{name}.port")
        self.stderr = open(os.path.join(rundir, f"fake-{name}.stderr"), "w")
        cmd = [sys.executable, os.path.join(HERE, "fake_entra.py"), "--cert", cert, "--key", key, "--port", "0",
               "--log", self.log, "--ready-file", ready, "--bind", bind] + \
            (["--token-file", token_file] if token_file else [])
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
        if not self.stderr.closed:
            self.stderr.close()


# ---- the daemon -----------------------------------------------------------------------------------

def unprivileged_prefix(uid=NOBODY):
    """argv prefix: uid/gid uid, no supplementary group, no capability (bounding set empty), no_new_privs."""
    return [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs"]


def only_cap_prefix(cap):
    """argv prefix: root, but with cap as its only capability (a container with drop ALL, add cap)."""
    return [SETPRIV, f"--inh-caps=-all,+{cap}", f"--bounding-set=-all,+{cap}", "--no-new-privs"]


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


def run_once(args, env=None, timeout=10, vgdir="/tmp", prefix=()):
    """Runs the binary to completion (config errors, --help), after the argv prefix (netns, setpriv).
    Returns (rc, stdout, stderr)."""
    before = set(os.listdir(vgdir)) if VALGRIND else set()
    p = subprocess.run(list(prefix) + command(args, vgdir), env=base_env(env), stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=timeout * SCALE, text=True, errors="replace")
    vg = None
    if VALGRIND:
        new = [f for f in os.listdir(vgdir) if f.startswith("vg.") and f not in before]
        vg = "".join(open(os.path.join(vgdir, f)).read() for f in new)
    check_tool_output(p.stderr, vg)
    return p.returncode, p.stdout, p.stderr


class Daemon:
    """imdsd running in the background with stderr in a file; start() waits for /healthz."""

    def __init__(self, args, env=None, workdir="/tmp", name="imdsd", port=None, netns=None, host="127.0.0.1",
                 unprivileged=False, prefix=()):
        """netns: run inside that network namespace (a NetNS); host: where /healthz is polled;
        unprivileged: as uid/gid NOBODY with no capability at all and no_new_privs (a pod's sidecar);
        prefix: an argv that runs the command (systemd-socket-activate ...; it must exec it)."""
        self.args, self.env, self.workdir, self.name = list(args), env, workdir, name
        self.prefix = list(prefix)
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
        self.proc = subprocess.Popen(prefix + command(self.args, self.vgdir), env=base_env(self.env),
                                     stdin=subprocess.DEVNULL, stdout=self.logf, stderr=self.logf)
        LIVE.append(self)
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

try:
    import pytest
    Skip = pytest.skip.Exception   # raise Skip("why"): the test is reported as skipped
except ImportError:                # the bench imports this module without pytest
    class Skip(Exception):
        pass


class Ctx:
    """Fresh state for one test: a temp dir, unique tenants, daemons that are stopped and checked."""

    def __init__(self, name, tmp, certs, fakes):
        self.name, self.tmp, self.certs = name, tmp, certs
        self.fake, self.fake_wronghost, self.fake_rogue = fakes["good"], fakes["wronghost"], fakes["rogue"]
        self.daemons, self.n = [], 0
        self.scale = SCALE
        self.cleanups = []   # callables run by finish() after the daemons stopped, last added first

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
               args=None, start=True, port=None, log_level="debug", wait=True, netns=None, host="127.0.0.1",
               unprivileged=False, prefix=()):
        """Starts imdsd against the fake; returns the Daemon (d.port, d.tenant, d.token).
        netns/host: run it inside that network namespace and poll /healthz there on host:port."""
        tenant = tenant or self.tenant("ok")
        token = token or self.token()
        port = port or free_port()
        if args is None:
            args = self.daemon_args(tenant, token, port, fake, client_id, extra, log_level)
        self.n += 1
        d = Daemon(args, env, self.tmp, f"imdsd-{self.n}", port, netns=netns, host=host, unprivileged=unprivileged,
                   prefix=prefix)
        d.tenant, d.token = tenant, token
        (fake or self.fake).control(tenant, token_file=token.path)
        self.daemons.append(d)
        if start:
            d.start(wait=wait)
        return d

    def run(self, args, env=None, timeout=10):
        return run_once(args, env, timeout, self.tmp)

    def netns(self):
        """A fresh network namespace (lo up) for this test, deleted by finish()."""
        ns = NetNS.create()
        self.cleanups.append(ns.delete)
        return ns

    def netns_daemon(self, host, port, addresses=(), extra=(), imds_address=False):
        """A network namespace standing for a pod or a VM: the addresses (CIDR) on its lo, a stand-in
        Entra on its localhost, and imdsd inside serving tokens on host:port (extra: more flags).
        imds_address: the pod's IMDS-address option with its privileges: 169.254.169.254 added by
        `imdsd --add-loopback-address` holding CAP_NET_ADMIN alone (the init container), the pod
        sysctl net.ipv4.ip_unprivileged_port_start=80, and imdsd as NOBODY with no capability.
        Returns (ns, daemon, fake)."""
        ns = self.netns()
        for a in addresses:
            ns.ip("addr", "add", a, "dev", "lo")
        if imds_address:
            rc, out, err = run_once(["--add-loopback-address", "169.254.169.254"],
                                    prefix=ns.prefix() + only_cap_prefix("net_admin"), vgdir=self.tmp)
            assert rc == 0 and "result=added" in err, f"init mode: status {rc}: {err.strip()}"
            p = subprocess.run(ns.prefix() + ["sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=80"],
                               capture_output=True, text=True)
            assert p.returncode == 0, f"sysctl in {ns}: {p.stderr.strip()}"
        tok = self.token()
        tenant = self.tenant("ok")
        fake = Fake(self.tmp, f"netns-{self.n}", self.certs["leaf.pem"], self.certs["leaf.key"], netns=ns,
                    token_file=tok.path)
        self.cleanups.append(fake.stop)
        args = self.daemon_args(tenant, tok, port, fake, extra=extra)
        args[args.index("--listen") + 1] = f"{host}:{port}"
        d = self.daemon(tenant, tok, args=args, fake=fake, port=port, netns=ns, host=host,
                        unprivileged=imds_address)
        return ns, d, fake

    def finish(self):
        """Stops every daemon this test started, then runs the cleanups; returns the reasons any daemon
        did not stop cleanly (or a cleanup failed)."""
        errors = []
        for d in self.daemons:
            try:
                d.stop()
            except AssertionError as e:
                errors.append(str(e))
            finally:
                d.kill()
        while self.cleanups:
            fn = self.cleanups.pop()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - reported like a daemon that did not stop
                errors.append(f"cleanup {getattr(fn, '__qualname__', fn)} failed: {e}")
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
