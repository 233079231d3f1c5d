#!/usr/bin/python3
"""fake_entra.py - a stand-in for Entra ID's v2 token endpoint, over real TLS (stdlib only).

POST /<tenant>/oauth2/v2.0/token   checks the client-credentials + jwt-bearer form like Entra
POST /_control  {"tenant": T, "script": [behaviour, ...], "token_file": PATH, "default": behaviour}
                (all but tenant optional; "default": null goes back to the name's behaviour)
POST /_control  {"release": NAME} opens gate NAME (see gate-NAME); {"gated": NAME} -> {"waiting": n}
POST /_control  {"tenant": T, "chaos": {"p": 0.2, "kinds": [behaviour, ...], "ok": behaviour, "seed": n}}
                chaos mode for T ("chaos": null ends it), see below
POST /_control  {"serve": "main" | "alt"} the certificate new handshakes get (--alt-cert)
GET  /_stats    {"calls": {tenant: n}, "accepted": n, "tls_failures": n, "resumed": n, "issued": n,
                 "inflight": {tenant: n}, "max_inflight": {tenant: n},
                 "behaviours": {tenant: {behaviour: n}}}
                (resumed: TLS handshakes that resumed an earlier session, of the accepted connections)

The behaviour of a token request is the next scripted one for its tenant, else the tenant's
default: the one set with "default" if any, else the part of the tenant name before the first "."
if it names a behaviour, else "ok". inflight counts token requests of a tenant being answered
(from the parsed request to the end of the answer, a slow-N sleep included); max_inflight is the
most there ever were at once.
Behaviours: ok[-expN][-refN][-padN][-close], aadsts-<code>, http500, http503, http429, garbage, big, reset,
truncated, slow-<seconds>, gate-<name>, nojson-token. -padN makes the access token N bytes longer;
-close answers with "Connection: close" and closes the connection after the answer (so the next
exchange needs a new TCP connection and TLS handshake);
gate-<name> holds the answer until a /_control "release" of that name (60 s at most), then is ok.
Chaos mode (the soak test): a token request of T that no script answers gets, with probability p,
one of "kinds" picked uniformly, else "ok"; the picks come from random.Random(seed), so a seed
gives the same sequence of picks (which request gets which pick depends on timing). A slow-N or
gate-NAME pick then answers as "ok" does (say ok-exp20), not as plain ok.
Every token request appends one JSON line to --log (with the sha256, jti and iat of the
client_assertion it presented, the SNI name its connection sent, its Host header and path, and
"chaos": true when chaos mode picked its behaviour).
--no-resumption gives every connection a TLS context of its own, so that no handshake can resume an
earlier session (neither by session id nor by ticket): every one is a full handshake.
--path-prefix P stands for an AKS identity binding's token proxy at https://HOST:PORT/P: the token
endpoint is P/<tenant>/oauth2/v2.0/token, and the path without P is not found.
"""
import argparse, base64, hashlib, json, os, random, re, socket, ssl, struct, sys, threading, time, uuid
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWS_RE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
BEHAVIOUR_RE = re.compile(r"^(ok(-exp\d+)?(-ref\d+)?(-pad\d+)?(-close)?|aadsts-\d+|http500|http503|http429|garbage|"
                          r"big|reset|truncated|slow-\d+(\.\d+)?|gate-[a-z0-9]+|nojson-token)$")
# code -> (HTTP status, error, description); {..} fields are filled from the request.
AADSTS = {
    700016: (400, "unauthorized_client", "Application with identifier '{client_id}' was not found in the "
             "directory '{tenant}'. You may have sent your authentication request to the wrong tenant."),
    70021: (400, "invalid_request", "No matching federated identity record found for presented assertion. "
            "Assertion Issuer: '{iss}'. Assertion Subject: '{sub}'. Assertion Audience: '{aud}'."),
    700024: (401, "invalid_client", "Client assertion is not within its valid time range. Current time: "
             "{now}, assertion valid from {nbf}, expiry time of assertion {exp}."),
    90002: (400, "invalid_request", "Tenant '{tenant}' not found. Check to make sure you have the correct "
            "tenant ID and are signing into the correct cloud."),
    500011: (400, "invalid_resource", "The resource principal named {resource} was not found in the tenant "
             "named {tenant}."),
    70011: (400, "invalid_scope", "The provided value for the input parameter 'scope' is not valid. "
            "The scope {scope} is not valid."),
    900144: (400, "invalid_request", "The request body must contain the following parameter: '{param}'."),
    70003: (400, "unsupported_grant_type", "The app requested an unsupported grant type '{grant_type}'."),
    7000216: (400, "invalid_request", "'client_assertion', 'client_secret' or 'request' is required for "
              "the 'client_credentials' grant type."),
    50027: (400, "invalid_request", "JWT token is invalid or malformed."),
    9002313: (400, "invalid_request", "Invalid request. Request is malformed or invalid."),
    90055: (429, "temporarily_unavailable", "TenantThrottlingError - There are too many incoming requests."),
}
LOCK = threading.Lock()
STATE = {"calls": {}, "accepted": 0, "tls_failures": 0, "resumed": 0, "issued": 0, "inflight": {}, "max_inflight": {},
         "behaviours": {}}
SCRIPTS, TOKEN_FILES, DEFAULTS = {}, {}, {}
CHAOS = {}   # tenant -> {"p", "kinds", "ok", "rng"}
GATES, GATE_WAITING = {}, {}   # name -> threading.Event; name -> requests held at it now


def gate(name):
    with LOCK:
        return GATES.setdefault(name, threading.Event())


class Blanks(dict):
    def __missing__(self, key):
        return "?"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_claims(jwt):
    try:
        part = jwt.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except Exception:
        return {}


def fake_access_token(tenant, client_id, resource, expires_in, n):
    now = int(time.time())
    head = {"typ": "JWT", "alg": "RS256", "kid": "fake-entra"}
    body = {"aud": resource, "iss": f"https://sts.windows.net/{tenant}/", "iat": now, "nbf": now,
            "exp": now + expires_in, "appid": client_id, "tid": tenant, "n": n, "uti": uuid.uuid4().hex}
    return ".".join(b64url(json.dumps(x, separators=(",", ":")).encode()) for x in (head, body)) \
        + "." + b64url(os.urandom(64))


def check_form(headers, body, tenant, token_file):
    """Returns (fields, problems, aadsts code or None, extra fields for the message)."""
    problems, fields = [], {}
    ctype = headers.get("Content-Type", "")
    if ctype.split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        problems.append(f"content-type {ctype!r}")
    try:
        pairs = urllib.parse.parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=True)
    except (ValueError, UnicodeDecodeError) as e:
        return fields, problems + [f"form does not parse: {e}"], 9002313, {}
    for k, v in pairs:
        if k in fields:
            problems.append(f"duplicate field {k}")
        fields[k] = v
    if problems:
        return fields, problems, 9002313, {}
    for name in ("grant_type", "client_id", "scope", "client_assertion_type", "client_assertion"):
        if not fields.get(name):
            return fields, [f"missing {name}"], 900144, {"param": name}
    if fields["grant_type"] != "client_credentials":
        return fields, [f"grant_type {fields['grant_type']!r}"], 70003, {}
    if fields["client_assertion_type"] != JWT_BEARER:
        return fields, [f"client_assertion_type {fields['client_assertion_type']!r}"], 7000216, {}
    if not fields["scope"].endswith("/.default") or " " in fields["scope"]:
        return fields, [f"scope {fields['scope']!r}"], 70011, {}
    if not JWS_RE.match(fields["client_assertion"]):
        return fields, ["client_assertion is not a compact JWS"], 50027, {}
    if token_file:
        try:
            with open(token_file, "rb") as f:
                want = f.read().decode().strip()
        except OSError as e:
            want = f"<unreadable: {e}>"
        if fields["client_assertion"] != want:
            return fields, ["client_assertion does not match the token file"], 700024, {}
    return fields, [], None, {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-entra/1.0"
    timeout = 60

    def __init__(self, *args, conn_id=0, **kw):
        self.conn_id = conn_id
        super().__init__(*args, **kw)

    def log_message(self, fmt, *args):  # keep stderr quiet; the JSON log is the record
        pass

    def send(self, status, body, ctype="application/json; charset=utf-8", extra=(), length=None, mode=""):
        """Writes a response; mode "reset" ends it with a TCP RST, "truncated" with a short body + close."""
        if isinstance(body, (dict, list)):
            body = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.send_header("Cache-Control", "no-store, no-cache")
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        if mode == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if mode:
            self.close_connection = True

    @staticmethod
    def aadsts(code, extra=(), **kw):
        """The reply (status, body, ...) for an AADSTS error, shaped like Entra's."""
        status, error, text = AADSTS.get(code, (400, "invalid_request", "Fake error {code}."))
        trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
        ts = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
        desc = text.format_map(Blanks(kw, code=code))
        return dict(status=status, extra=extra, body={
            "error": error, "error_description": f"AADSTS{code}: {desc}\r\nTrace ID: {trace}\r\n"
            f"Correlation ID: {corr}\r\nTimestamp: {ts}", "error_codes": [code], "timestamp": ts,
            "trace_id": trace, "correlation_id": corr, "error_uri": f"https://login.microsoftonline.com/error?code={code}"})

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(min(n, 1 << 20)) if n > 0 else b""

    def do_GET(self):
        if self.path == "/_stats":
            with LOCK:
                return self.send(200, json.loads(json.dumps(STATE)))
        self.send(404, {"error": "not_found"})

    def do_POST(self):
        body = self.read_body()
        if self.path == "/_control":
            req = json.loads(body)
            if "serve" in req:
                if req["serve"] not in ("main", "alt") or (req["serve"] == "alt" and not self.server.alt_ctx):
                    return self.send(400, {"error": "serve is main or alt (with --alt-cert)"})
                with LOCK:
                    self.server.serving = req["serve"]
                return self.send(200, {"ok": True})
            if "release" in req:
                gate(req["release"]).set()
                return self.send(200, {"ok": True})
            if "gated" in req:
                with LOCK:
                    return self.send(200, {"ok": True, "waiting": GATE_WAITING.get(req["gated"], 0)})
            chaos = req.get("chaos")
            bad = [b for b in list(req.get("script") or []) + [req.get("default") or "ok"]
                   + (list(chaos.get("kinds") or []) + [chaos.get("ok") or "ok"] if chaos else [])
                   if not BEHAVIOUR_RE.match(b)]
            if bad:
                return self.send(400, {"error": "unknown behaviour", "behaviours": bad})
            if chaos and not (0 <= float(chaos.get("p", 0)) <= 1 and chaos.get("kinds")):
                return self.send(400, {"error": "chaos needs 0 <= p <= 1 and at least one kind"})
            with LOCK:
                if chaos:
                    CHAOS[req["tenant"]] = {"p": float(chaos["p"]), "kinds": list(chaos["kinds"]),
                                            "ok": chaos.get("ok") or "ok",
                                            "rng": random.Random(chaos.get("seed"))}
                elif "chaos" in req:
                    CHAOS.pop(req["tenant"], None)
                if "script" in req:
                    SCRIPTS[req["tenant"]] = list(req["script"])
                if "token_file" in req:
                    TOKEN_FILES[req["tenant"]] = req["token_file"]
                if req.get("default") is not None:
                    DEFAULTS[req["tenant"]] = req["default"]
                elif "default" in req:
                    DEFAULTS.pop(req["tenant"], None)
            return self.send(200, {"ok": True})
        prefix = self.server.path_prefix
        path = self.path[len(prefix):] if prefix and self.path.startswith(prefix + "/") else \
            (None if prefix else self.path)
        m = re.match(r"^/([^/?]+)/oauth2/v2\.0/token$", path or "")
        if not m:
            return self.send(404, {"error": "not_found", "error_description": "no such endpoint"})
        tenant = urllib.parse.unquote(m.group(1))
        with LOCK:
            STATE["calls"][tenant] = STATE["calls"].get(tenant, 0) + 1
            n = STATE["inflight"][tenant] = STATE["inflight"].get(tenant, 0) + 1
            STATE["max_inflight"][tenant] = max(n, STATE["max_inflight"].get(tenant, 0))
        try:
            self.token_request(tenant, body)
        finally:
            with LOCK:
                STATE["inflight"][tenant] -= 1

    def token_request(self, tenant, body):
        with LOCK:
            queue = SCRIPTS.get(tenant)
            default = tenant.split(".", 1)[0]
            default = DEFAULTS.get(tenant) or (default if BEHAVIOUR_RE.match(default) else "ok")
            behaviour = queue.pop(0) if queue else default
            chaos, ok = (None if queue else CHAOS.get(tenant)), "ok"
            if chaos:
                ok = chaos["ok"]
                behaviour = chaos["kinds"][chaos["rng"].randrange(len(chaos["kinds"]))] \
                    if chaos["rng"].random() < chaos["p"] else ok
            per = STATE["behaviours"].setdefault(tenant, {})
            per[behaviour] = per.get(behaviour, 0) + 1
            token_file = TOKEN_FILES.get(tenant, self.server.token_file)
        fields, problems, code, extra = check_form(self.headers, body, tenant, token_file)
        assertion = jwt_claims(fields.get("client_assertion", ""))
        rec = {"time": time.time(), "tenant": tenant, "client_id": fields.get("client_id"),
               "scope": fields.get("scope"), "grant_type": fields.get("grant_type"),
               "client_assertion_type": fields.get("client_assertion_type"),
               "assertion_sha256": hashlib.sha256(fields.get("client_assertion", "").encode()).hexdigest(),
               "assertion_jti": assertion.get("jti") if isinstance(assertion, dict) else None,
               "assertion_iat": assertion.get("iat") if isinstance(assertion, dict) else None,
               "fields": sorted(fields), "form_ok": not problems, "problems": problems,
               "behaviour": behaviour, "conn": self.conn_id, "access_token": None,
               "sni": getattr(self.connection, "sni_name", None), "host": self.headers.get("Host"),
               "path": self.path}
        if chaos:
            rec["chaos"] = True
        if code is not None:
            reply = self.aadsts(code, tenant=tenant, scope=fields.get("scope"), client_id=fields.get("client_id"),
                                grant_type=fields.get("grant_type"), **extra)
        else:
            reply = self.behave(behaviour, tenant, fields, rec, ok)
        rec["status"] = "reset" if reply.get("mode") == "reset" else reply["status"]
        with LOCK, open(self.server.log_path, "a") as f:   # logged before the daemon can see the answer
            f.write(json.dumps(rec) + "\n")
        try:
            self.send(**reply)
        except (OSError, ssl.SSLError) as e:
            print(f"fake_entra: conn {self.conn_id}: write failed: {e!r}", file=sys.stderr, flush=True)
            self.close_connection = True

    def behave(self, behaviour, tenant, fields, rec, ok="ok"):
        """The reply for a valid form under behaviour; records the issued token in rec. A slow-N or
        gate-NAME behaviour answers as ok does after its wait."""
        resource = fields["scope"][: -len("/.default")]
        claims = jwt_claims(fields["client_assertion"])
        if behaviour.startswith("slow-"):
            time.sleep(float(behaviour[5:]))
            behaviour = ok
        if behaviour.startswith("gate-"):
            name = behaviour[5:]
            with LOCK:
                GATE_WAITING[name] = GATE_WAITING.get(name, 0) + 1
            gate(name).wait(60)
            with LOCK:
                GATE_WAITING[name] -= 1
            behaviour = ok
        if behaviour.startswith("ok"):
            exp = int((re.search(r"-exp(\d+)", behaviour) or [0, 3599])[1])
            with LOCK:
                STATE["issued"] += 1
                n = STATE["issued"]
            tok = fake_access_token(tenant, fields["client_id"], resource, exp, n)
            pad = re.search(r"-pad(\d+)", behaviour)
            if pad:
                tok += "A" * int(pad[1])
            out = {"token_type": "Bearer", "expires_in": exp, "ext_expires_in": exp, "access_token": tok}
            ref = re.search(r"-ref(\d+)", behaviour)
            if ref:
                out["refresh_in"] = int(ref[1])
            rec.update(access_token=tok, expires_in=exp)
            if behaviour.endswith("-close"):
                return dict(status=200, body=out, extra=[("Connection", "close")], mode="close")
            return dict(status=200, body=out)
        if behaviour.startswith("aadsts-"):
            return self.aadsts(int(behaviour[7:]), tenant=tenant, client_id=fields["client_id"],
                               scope=fields["scope"], resource=resource, now=time.time(), iss=claims.get("iss"),
                               sub=claims.get("sub"), aud=claims.get("aud"), nbf=claims.get("nbf"),
                               exp=claims.get("exp"))
        if behaviour == "http429":
            return self.aadsts(90055, extra=[("Retry-After", "7")])
        html = "text/html; charset=utf-8"
        return {"http500": dict(status=500, body=b"<html><body>Internal error</body></html>", ctype=html),
                "http503": dict(status=503, body=b"<html><body>Service unavailable</body></html>", ctype=html),
                "garbage": dict(status=200, body=b"<html>this is not json {{{", ctype=html),
                "nojson-token": dict(status=200, body={"token_type": "Bearer", "expires_in": 3599,
                                                       "ext_expires_in": 3599}),
                "big": dict(status=200, body=b'{"token_type":"Bearer","expires_in":3599,"access_token":"'
                            + b"A" * (2 << 20) + b'"}'),
                "truncated": dict(status=200, body=b'{"token_type":"Bearer","expires_in":3599,"access_tok',
                                  length=4000, mode="truncated"),
                "reset": dict(status=200, body=b'{"token_type":"Bearer",', length=4000, mode="reset"),
                }[behaviour]


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def finish_request(self, request, client_address):
        """TLS handshake in the per-connection thread, so a stuck client cannot block accept()."""
        with LOCK:
            STATE["accepted"] += 1
            conn_id = STATE["accepted"]
        request.settimeout(30)
        # head and body go out in separate sends: without this the body waits for a delayed ACK
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls = (self.new_ctx() if self.no_resumption else self.ssl_ctx).wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            with LOCK:
                STATE["tls_failures"] += 1
            print(f"fake_entra: conn {conn_id}: TLS handshake failed: {e}", file=sys.stderr, flush=True)
            return
        if tls.session_reused:
            with LOCK:
                STATE["resumed"] += 1
        try:
            Handler(tls, client_address, self, conn_id=conn_id)
        finally:
            tls.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("--log", required=True)
    ap.add_argument("--ready-file")
    ap.add_argument("--token-file")
    ap.add_argument("--path-prefix", default="")
    ap.add_argument("--alt-cert")
    ap.add_argument("--alt-key")
    ap.add_argument("--no-resumption", action="store_true")
    a = ap.parse_args()

    def server_ctx(cert, key):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert, key)
        return ctx
    ctx = server_ctx(a.cert, a.key)
    srv = Server((a.bind, a.port), Handler)
    srv.alt_ctx = server_ctx(a.alt_cert, a.alt_key) if a.alt_cert else None
    srv.serving, srv.path_prefix = "main", a.path_prefix.rstrip("/")

    def on_sni(sock, name, _ctx):   # notes the name the client sent, picks the certificate
        sock.sni_name = name
        if srv.serving == "alt":
            sock.context = srv.alt_ctx
    ctx.sni_callback = on_sni

    def new_ctx():   # --no-resumption: a context (session cache, ticket key) per connection
        c = server_ctx(a.cert, a.key)
        c.sni_callback = on_sni
        return c
    srv.new_ctx, srv.no_resumption = new_ctx, a.no_resumption
    srv.ssl_ctx, srv.log_path, srv.token_file = ctx, a.log, a.token_file
    open(a.log, "a").close()
    if a.ready_file:
        with open(a.ready_file + ".tmp", "w") as f:
            f.write(f"{srv.server_address[1]}\n")
        os.rename(a.ready_file + ".tmp", a.ready_file)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
