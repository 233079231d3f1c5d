"""sdk_clients.py - runs the real Azure SDK clients (js_client.mjs, py_client.py) for the integration
tests test_sdk_*.py, and captures what they send to imdsd (capture.py).

The clients get ONLY the environment an application container would have: PATH, HOME and what the
scenario sets (AZURE_POD_IDENTITY_AUTHORITY_HOST, or IDENTITY_ENDPOINT + IDENTITY_HEADER, optionally
AZURE_CLIENT_ID). Never AZURE_FEDERATED_TOKEN_FILE / AZURE_TENANT_ID / AZURE_AUTHORITY_HOST: with those the
SDKs do the exchange themselves and bypass imdsd (imds-protocol.md trap T8).
"""
import base64, fcntl, json, math, os, re, shutil, signal, subprocess, time, urllib.parse

import harness

COMPAT = os.path.dirname(os.path.abspath(__file__))
NODE = shutil.which("node") or "/usr/bin/node"
NPM = shutil.which("npm") or "/usr/bin/npm"
PY = "/usr/bin/python3"            # Debian's python with python3-azure, never a pyenv one
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FORBIDDEN = ("AZURE_FEDERATED_TOKEN_FILE", "AZURE_TENANT_ID", "AZURE_AUTHORITY_HOST", "AZURE_CLIENT_SECRET",
             "AZURE_CLIENT_CERTIFICATE_PATH", "AZURE_USERNAME", "MSI_ENDPOINT", "MSI_SECRET", "IMDS_ENDPOINT",
             "IDENTITY_SERVER_THUMBPRINT", "AZURE_TOKEN_CREDENTIALS")
_js_dir = None   # where the JS client runs: COMPAT (Node >= 20) or COMPAT/node18


# ---- set-up ---------------------------------------------------------------------------------------

def node_major():
    """The major version of the node on PATH, or None."""
    if not os.access(NODE, os.X_OK):
        return None
    out = subprocess.run([NODE, "--version"], capture_output=True, text=True).stdout.strip()
    return int(out.lstrip("v").split(".")[0]) if out.startswith("v") else None


def js_dir():
    """The pinned client for this node: @azure/identity 4.13.1 (tests/compat) on Node >= 20, else 4.9.1,
    the newest whose engines accept Node 18 (tests/compat/node18: Debian 12's own nodejs is 18).
    Skips the test, saying why, when there is no node or npm it can run."""
    major = node_major()
    if major is None:
        raise harness.Skip("node is not installed (make deps installs Debian's nodejs)")
    if major < 18:
        raise harness.Skip(f"node {major} is too old: the oldest pinned client, @azure/identity 4.9.1, "
                           "needs Node.js >= 18")
    if not os.access(NPM, os.X_OK):
        raise harness.Skip("npm is not installed (make deps installs Debian's npm)")
    return COMPAT if major >= 20 else os.path.join(COMPAT, "node18")


SYSTEM_CAS = "/etc/ssl/certs/ca-certificates.crt"


def npm_env():
    """npm's environment: trusting the system's CA store as apt, git and curl do. Node trusts only its
    own bundled roots, so behind a proxy that re-signs TLS with a CA the machine trusts (a corporate or
    sandbox egress proxy), a bare Debian's npm fails with SELF_SIGNED_CERT_IN_CHAIN."""
    env = dict(os.environ)
    if "NODE_EXTRA_CA_CERTS" not in env and os.path.exists(SYSTEM_CAS):
        env["NODE_EXTRA_CA_CERTS"] = SYSTEM_CAS
    return env


def npm_ci(where):
    """npm ci in where when its node_modules is missing or older than package-lock.json, under a lock
    on the lock file so that parallel runs do not race."""
    lock = os.path.join(where, "package-lock.json")
    stamp = os.path.join(where, "node_modules", ".package-lock.json")
    with open(lock) as lk:           # the lock file itself serialises parallel runs
        fcntl.flock(lk, fcntl.LOCK_EX)
        if not os.path.exists(stamp) or os.path.getmtime(stamp) < os.path.getmtime(lock):
            # set-up, not test time: hold the runner's per-test alarm while npm works
            left = signal.getitimer(signal.ITIMER_REAL)[0]
            signal.setitimer(signal.ITIMER_REAL, 0)
            try:
                p = subprocess.run([NPM, "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
                                   cwd=where, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                   timeout=600, env=npm_env())
            finally:
                if left:
                    signal.setitimer(signal.ITIMER_REAL, left)
            assert p.returncode == 0, f"npm ci in {where} failed: {p.stderr.strip()[-800:]}"
            os.utime(stamp)


def ensure_node_modules():
    """npm ci in the client's directory when node_modules is missing or older than package-lock.json
    (once per run, under a lock so parallel runs do not race)."""
    global _js_dir
    if _js_dir is not None:
        return _js_dir
    where = js_dir()
    if where != COMPAT:   # the same client program, next to the node_modules it must import from
        shutil.copyfile(os.path.join(COMPAT, "js_client.mjs"), os.path.join(where, "js_client.mjs"))
    npm_ci(where)
    _js_dir = where
    return where


def js_identity_version():
    """The version of @azure/identity the JS client runs, as a tuple: (4, 13, 1) or (4, 9, 1)."""
    with open(os.path.join(ensure_node_modules(), "node_modules", "@azure", "identity", "package.json")) as f:
        return tuple(int(x) for x in json.load(f)["version"].split("-")[0].split("."))


def client_env(ctx, _allow=(), **scenario):
    """The application container's environment: PATH, HOME (empty, per test) and the scenario's variables
    (_allow: forbidden names the scenario sets on purpose, e.g. the MSI_* protocol's own)."""
    home = os.path.join(ctx.tmp, "home")
    os.makedirs(home, exist_ok=True)
    env = {"PATH": CONTAINER_PATH, "HOME": home}
    for k, v in scenario.items():
        if v is not None:
            env[k] = v
    bad = [k for k in env if k in FORBIDDEN and k not in _allow]
    assert not bad, f"client environment must not contain {bad} (trap T8)"
    return env


def imds_env(ctx, port, host="127.0.0.1", **more):
    return client_env(ctx, AZURE_POD_IDENTITY_AUTHORITY_HOST=f"http://{host}:{port}", **more)


def arc_env(ctx, port, **more):
    """IDENTITY_ENDPOINT + IMDS_ENDPOINT: the Azure Arc challenge protocol."""
    return client_env(ctx, _allow=("IMDS_ENDPOINT",), IDENTITY_ENDPOINT=f"http://127.0.0.1:{port}{harness.TOKEN_PATH}",
                      IMDS_ENDPOINT=f"http://127.0.0.1:{port}", **more)


def cloud_shell_env(ctx, port, path=harness.TOKEN_PATH, **more):
    """MSI_ENDPOINT alone: the Cloud Shell protocol (a form POST with Metadata: true)."""
    return client_env(ctx, _allow=("MSI_ENDPOINT",), MSI_ENDPOINT=f"http://127.0.0.1:{port}{path}", **more)


def msi2017_env(ctx, port, secret, path="/msi/token", **more):
    """MSI_ENDPOINT + MSI_SECRET: App Service 2017-09-01, which today's SDKs call Azure ML."""
    return client_env(ctx, _allow=("MSI_ENDPOINT", "MSI_SECRET"), MSI_ENDPOINT=f"http://127.0.0.1:{port}{path}",
                      MSI_SECRET=secret, **more)


def app_service_env(ctx, port, secret, path="/MSI/token", **more):
    return client_env(ctx, IDENTITY_ENDPOINT=f"http://127.0.0.1:{port}{path}", IDENTITY_HEADER=secret, **more)


# ---- running a client -----------------------------------------------------------------------------

def _run(ctx, kind, argv, spec, env, netns, timeout, cwd=COMPAT, prefix=()):
    ctx.n += 1
    timeout = timeout or 30 * harness.SCALE
    base = os.path.join(ctx.tmp, f"{kind}-{ctx.n}")
    spec = dict(spec, log=True)
    with open(base + ".json", "w") as f:
        json.dump({"spec": spec, "env": env, "netns": netns.name if netns else None}, f, indent=1)
    prefix = (netns.prefix() if netns is not None else []) + list(prefix)
    t0 = time.monotonic()
    with open(base + ".stderr", "w") as err:
        try:
            p = subprocess.run(prefix + argv + [json.dumps(spec)], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{kind} client ({spec['credential']}) still running after {timeout:.0f} s "
                                 f"(retrying?); stderr in {base}.stderr") from None
    elapsed = time.monotonic() - t0
    with open(base + ".out", "w") as f:
        f.write(p.stdout)
    lines = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    assert p.returncode == 0 and len(lines) == len(spec["scopes"]), \
        f"{kind} client exited {p.returncode} with {len(lines)} result lines for {len(spec['scopes'])} scopes " \
        f"(stderr in {base}.stderr): {p.stdout[-500:]!r}"
    for r in lines:
        r["process_seconds"] = elapsed
    return lines


def run_js(ctx, credential, scopes, env, options=None, netns=None, timeout=None):
    """Runs @azure/identity's credential (ManagedIdentityCredential or DefaultAzureCredential) with
    options, one getToken per scope; returns one dict per scope (see js_client.mjs)."""
    where = ensure_node_modules()
    spec = {"credential": credential, "options": options or {}, "scopes": list(scopes)}
    return _run(ctx, "js", [NODE, os.path.join(where, "js_client.mjs")], spec, env, netns, timeout, cwd=where)


def run_py(ctx, credential, scopes, env, options=None, netns=None, timeout=None, prefix=()):
    """Runs azure-identity's credential with options (keyword arguments), one get_token per scope;
    returns one dict per scope (see py_client.py). prefix: e.g. setpriv, to run as another user."""
    spec = {"credential": credential, "options": options or {}, "scopes": list(scopes)}
    client = os.path.join(COMPAT, "py_client.py")
    if prefix:   # another user: a copy it can read when the checkout is out of its reach
        client = harness.reachable_by_all(client)
    return _run(ctx, "py", [PY, client], spec, env, netns, timeout, prefix=prefix)


GO_CLIENT = os.path.join(os.path.dirname(os.path.dirname(COMPAT)), "build", "go_adal_client")


def run_go(ctx, scopes, env, netns=None, timeout=None):
    """go-autorest adal's MSI token from 169.254.169.254, one per scope; returns one dict per scope
    (see go_adal_client.go). Skips, saying why, when make has not built the client."""
    if not os.access(GO_CLIENT, os.X_OK):
        raise harness.Skip(f"{GO_CLIENT} is not built: make build/go_adal_client (make deps installs "
                           "Debian's golang-go and golang-github-azure-go-autorest-dev)")
    spec = {"credential": "adal MSI (go-autorest)", "scopes": list(scopes)}
    return _run(ctx, "go", [GO_CLIENT], spec, env, netns, timeout)


# ---- packet capture of imdsd's port ---------------------------------------------------------------

class Exchange:
    """One HTTP request as a client sent it on the wire, and imdsd's answer."""

    def __init__(self, conn, t_req, raw_req, t_resp, raw_resp):
        self.conn, self.t_req, self.t_resp = conn, t_req, t_resp
        head = raw_req.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        self.request_line = head[0]
        parts = head[0].split(" ")
        self.method, self.target = parts[0], parts[1] if len(parts) > 1 else ""
        self.path, _, self.query_string = self.target.partition("?")
        self.query = urllib.parse.parse_qsl(self.query_string, keep_blank_values=True)
        self.headers = [tuple(x.strip() for x in l.split(":", 1)) for l in head[1:] if ":" in l]
        self.response = harness.parse_raw(raw_resp) if raw_resp else None
        self.status = self.response.status if self.response else None

    def header(self, name):
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def q(self, name):
        return dict(self.query).get(name)

    @property
    def latency(self):
        return None if self.t_resp is None else self.t_resp - self.t_req

    def raw_request(self):
        return "\r\n".join([self.request_line] + [f"{k}: {v}" for k, v in self.headers])

    def __repr__(self):
        lat = f"{self.latency * 1000:.1f} ms" if self.latency is not None else "no answer"
        return f"<{self.request_line!r} -> {self.status} in {lat}>"


def _split_messages(stream):
    """stream: [(offset, t)] + bytes -> [(t, raw message)] by headers + Content-Length."""
    data, marks = stream
    out, pos = [], 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            break
        head = data[pos:end].decode("latin-1")
        m = re.search(r"(?im)^content-length:\s*(\d+)", head)
        n = int(m.group(1)) if m else 0
        stop = end + 4 + n
        t = next((tt for off, tt in reversed(marks) if off <= pos), marks[0][1] if marks else None)
        out.append((t, data[pos:min(stop, len(data))]))
        pos = stop
    return out


class Capture:
    """capture.py on imdsd's port (host loopback, or lo inside a NetNS) for the duration of a test step."""

    def __init__(self, ctx, port, netns=None):
        ctx.n += 1
        self.ctx, self.port, self.netns = ctx, port, netns
        self.out = os.path.join(ctx.tmp, f"capture-{ctx.n}.jsonl")
        ready = self.out + ".ready"
        self.stderr = open(self.out + ".stderr", "w")
        cmd = [PY, os.path.join(COMPAT, "capture.py"), "--port", str(port), "--out", self.out, "--ready", ready]
        self.proc = subprocess.Popen((netns.prefix() if netns else []) + cmd, stdin=subprocess.DEVNULL,
                                     stdout=self.stderr, stderr=self.stderr)
        ctx.cleanups.append(self.stop)
        harness.wait_for(lambda: os.path.exists(ready) or self.proc.poll() is not None, 10, "capture.py ready")
        assert self.proc.poll() is None, f"capture.py exited: {open(self.out + '.stderr').read()[-500:]}"
        self._exchanges = None

    def stop(self):
        """Stops the capture (after it drained the kernel's queue); idempotent."""
        if self.proc.poll() is None:
            time.sleep(0.1)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.stderr.closed:
            self.stderr.close()

    def exchanges(self):
        """Stops the capture; returns every HTTP exchange on the port, in the order the requests were sent."""
        if self._exchanges is not None:
            return self._exchanges
        self.stop()
        try:
            with open(self.out + ".stats") as f:
                stats = json.load(f)
        except (OSError, ValueError):
            raise AssertionError(f"capture.py did not finish cleanly: {open(self.out + '.stderr').read()[-500:]}")
        assert stats["drops"] == 0, f"the capture lost {stats['drops']} packets (socket buffer full)"
        conns = {}
        with open(self.out) as f:
            for line in f:
                seg = json.loads(line)
                to_server = seg["dport"] == self.port
                client = (seg["src"], seg["sport"]) if to_server else (seg["dst"], seg["dport"])
                c = conns.setdefault(client, {True: {}, False: {}, "isn": {}})
                if "S" in seg["flags"]:
                    c["isn"][to_server] = seg["seq"]
                data = base64.b64decode(seg["data"])
                if data:
                    c[to_server].setdefault(seg["seq"], (seg["t"], data))
        out = []
        for client, c in conns.items():
            streams = {}
            for direction in (True, False):
                segs = c[direction]
                if not segs:
                    streams[direction] = (b"", [])
                    continue
                isn = c["isn"].get(direction)
                base = (isn + 1) if isn is not None else min(segs)
                data, marks = b"", []
                for seq in sorted(segs, key=lambda s: (s - base) % (1 << 32)):
                    t, d = segs[seq]
                    off = (seq - base) % (1 << 32)
                    if off < len(data):          # retransmission
                        continue
                    marks.append((len(data), t))
                    data += d
                streams[direction] = (data, marks)
            reqs = _split_messages(streams[True])
            resps = _split_messages(streams[False])
            for i, (t, raw) in enumerate(reqs):
                tr, rr = resps[i] if i < len(resps) else (None, None)
                out.append(Exchange(f"{client[0]}:{client[1]}", t, raw, tr, rr))
        out.sort(key=lambda e: e.t_req)
        self._exchanges = out
        return out

    def token_requests(self):
        """The exchanges that are not the harness's own /healthz polls."""
        return [e for e in self.exchanges() if not e.path.lower().startswith(("/healthz", "/readyz"))]


# ---- assertions ---------------------------------------------------------------------------------------

def fake_issued(ctx, tenant, fake=None):
    """{access_token: record} of every token the fake issued for tenant."""
    return {r["access_token"]: r for r in (fake or ctx.fake).records(tenant) if r.get("access_token")}


def explain(results):
    """Short text of client results for assertion messages."""
    return "; ".join(f"{r['scope']}: " + ("ok" if r["ok"] else f"{r['error']['name']}: {r['error']['message'][:300]}")
                     for r in results)


# ---- scenario constants shared by test_sdk_js.py and test_sdk_python.py -------------------------------

ARM = "https://management.azure.com/.default"
VAULT = "https://vault.azure.net/.default"
STORAGE = "https://storage.azure.com/.default"
GRAPH = "https://graph.microsoft.com/.default"
GUID_SCOPE = "00000003-0000-0000-c000-000000000000/.default"
API_SCOPE = "api://5e1f0d2c-3b4a-4c5d-8e9f-a0b1c2d3e4f5/.default"
SIX_SCOPES = [ARM, VAULT, STORAGE, GRAPH, GUID_SCOPE, API_SCOPE]
OTHER_ID = "99999999-8888-7777-6666-555555555555"       # an --allow-client-id identity
UNKNOWN_ID = "00000000-dead-beef-0000-000000000000"     # served by nobody
OBJECT_ID = "7f3c1a2b-0d4e-4f5a-8b6c-9d0e1f2a3b4c"      # object (principal) id of OTHER_ID
RESOURCE_ID = ("/subscriptions/0b1f6471-1bf0-4dda-aec3-111122223333/resourceGroups/rg-app/providers/"
               "Microsoft.ManagedIdentity/userAssignedIdentities/id-app")
RESOURCE_ID_OTHER_CASE = RESOURCE_ID.lower().replace("/id-app", "/ID-App")   # ARM ids compare case-insensitively
ALIASES = ["--allow-client-id", OTHER_ID, "--identity-alias", f"{OBJECT_ID}={OTHER_ID}",
           "--identity-alias", f"{RESOURCE_ID}={OTHER_ID}"]
SECRET = "s3cr3t-identity-header-0123456789abcdef"


def fail_fast_limit():
    """A client that gives up at once takes a second or two; one that retries takes ~20-60 s."""
    return 10.0 * min(harness.SCALE, 2.0)


def fail_fast_timeout():
    """How long a client that should fail fast may run before it is killed and the test fails."""
    return 2.5 * fail_fast_limit()


def resource_of(scope):
    """What every SDK sends as resource: the scope without a trailing "/.default"."""
    return scope[: -len("/.default")] if scope.endswith("/.default") else scope


def check_tokens(ctx, tenant, results, client_id, cap=None, fake=None, expiry=None):
    """Every result is a token that the fake issued for exactly that scope (so the scope imdsd forwarded is
    the SDK's scope) to client_id. With cap and expiry ("js" or "py"), the expiry the client computed
    matches the expires_on imdsd served with that token. Returns {scope: fake record}."""
    issued = fake_issued(ctx, tenant, fake)
    bad = [r for r in results if not r["ok"]]
    assert not bad, f"SDK failed: {explain(bad)}"
    recs = {}
    for r in results:
        rec = issued.get(r["token"])
        assert rec is not None, f"{r['scope']}: the SDK returned a token the fake never issued"
        assert rec["scope"] == r["scope"], f"{r['scope']}: the token was issued for scope {rec['scope']!r}"
        assert rec["client_id"] == client_id, \
            f"{r['scope']}: token issued to client_id {rec['client_id']}, want {client_id}"
        recs[r["scope"]] = rec
    if cap is not None and expiry is not None:
        served = {}
        for e in cap.exchanges():
            j = e.response.json if e.response is not None else None
            if e.status == 200 and isinstance(j, dict) and "access_token" in j:
                served.setdefault(j["access_token"], (int(j["expires_on"]), e.latency or 0.0))
        seen = set()
        for r in results:
            assert r["token"] in served, f"{r['scope']}: imdsd's answer with this token is not in the capture"
            exp, lat = served[r["token"]]
            rec = issued[r["token"]]
            # imdsd: expires_on = when it sent the request to Entra + Entra's expires_in (never later)
            truth = rec["time"] + rec["expires_in"]
            assert truth - 2 - 3 * harness.SCALE <= exp <= truth + 1, \
                f"{r['scope']}: imdsd served expires_on {exp}, Entra's token expires at ~{truth:.0f}"
            first = r["token"] not in seen
            seen.add(r["token"])
            if expiry == "js":
                # msal-node: expiresOn = nowSeconds() before the request + (expires_on - nowSeconds() after the
                # answer), whole seconds: expires_on minus the call's duration rounded up (the capture's latency
                # plus a little client time), never more than expires_on.
                got, lo, hi = r["expiresOnTimestamp"], (exp - math.ceil(lat + 0.25)) * 1000, exp * 1000
                assert lo <= got <= hi, f"{r['scope']}: expiresOnTimestamp {got}, imdsd expires_on {exp} (x1000)"
            else:
                got = r["expires_on"]
                if first:
                    assert got == exp, f"{r['scope']}: AccessToken.expires_on {got} != imdsd expires_on {exp}"
                else:   # from the SDK's msal cache: int(time) before the request + expires_in (counted at the answer)
                    assert exp - math.ceil(lat) - 1 <= got <= exp + 1, \
                        f"{r['scope']}: cached AccessToken.expires_on {got} vs imdsd expires_on {exp} ({lat:.1f} s)"
    return recs


def assert_app_service_body(e):
    """imdsd's App Service 200: the App Service fields, all strings, and no expires_in."""
    j = e.response.json
    assert e.status == 200 and isinstance(j, dict), e.response
    assert sorted(j) == ["access_token", "client_id", "expires_on", "not_before", "resource", "token_type"], \
        f"App Service body fields {sorted(j)}"
    assert all(isinstance(v, str) for v in j.values()) and j["expires_on"].isdigit(), j


def write_secret(ctx, value=SECRET):
    """The --identity-header-file for imdsd (padded with whitespace, which imdsd trims)."""
    path = os.path.join(ctx.tmp, "identity-header")
    with open(path, "w") as f:
        f.write(f"  {value}\n")       # whitespace-trimmed by imdsd
    return path


def netns_setup(ctx):
    """A network namespace set up as container/kubernetes/deployment-imds-address.yaml sets up a pod:
    169.254.169.254 added by imdsd's init mode holding CAP_NET_ADMIN alone, then imdsd as uid 65532
    with no capability listening on 169.254.169.254:80 (the pod's ip_unprivileged_port_start sysctl);
    the fake Entra on its localhost. Returns (ns, daemon, fake)."""
    return ctx.netns_daemon("169.254.169.254", 80, imds_address=True)
