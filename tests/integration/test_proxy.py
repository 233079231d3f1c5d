"""Entra through an HTTP CONNECT proxy (HTTPS_PROXY / https_proxy, NO_PROXY / no_proxy).

connect_proxy.py is the proxy: it logs every CONNECT as a JSON line (target, whether the
credentials matched, its answer) without the credentials. The authority is https://localhost:PORT
(the fake), which the daemon reaches through the proxy unless NO_PROXY names it: loopback is not
exempted by itself. The proxy password must never reach imdsd's log or its error messages.
"""
import base64
import json
import os
import subprocess
import sys
import time

from harness import HERE, assert_json_error, assert_token_ok, get_token, log_events, wait_for

USER, PASSWORD = "svc-proxy", "Pr0xy-S3cret-pw"


class Proxy:
    """connect_proxy.py on a free port with its own JSON log; stopped by Ctx.finish."""

    def __init__(self, ctx, *args):
        ctx.n += 1
        base = os.path.join(ctx.tmp, f"proxy-{ctx.n}")
        self.log, ready = base + ".jsonl", base + ".port"
        self.stderr = open(base + ".stderr", "w")
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "connect_proxy.py"), "--port", "0",
                                      "--log", self.log, "--ready-file", ready] + list(args),
                                     stdin=subprocess.DEVNULL, stdout=self.stderr, stderr=self.stderr)
        ctx.cleanups.append(self.stop)
        wait_for(lambda: os.path.exists(ready) or self.proc.poll() is not None, 10, "connect_proxy.py")
        assert self.proc.poll() is None, f"connect_proxy.py exited: see {self.stderr.name}"
        self.port = int(open(ready).read())

    def url(self, user=None, password=None):
        cred = "" if user is None else user + ("" if password is None else ":" + password) + "@"
        return f"http://{cred}127.0.0.1:{self.port}"

    def records(self):
        with open(self.log) as f:
            return [json.loads(line) for line in f if line.strip()]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def assert_no_secret(ctx, d, *secrets):
    """Neither the password nor the Proxy-Authorization value shows up in imdsd's log."""
    text = d.log()
    for s in secrets:
        assert s not in text, f"{s[:4]}... appears in imdsd's log"
    assert "Proxy-Authorization" not in text and "proxy-authorization" not in text.lower(), \
        "a Proxy-Authorization header was logged"


def basic(user, password):
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_proxy_connect_success(ctx):
    """HTTPS_PROXY, and https_proxy alone: the exchange goes through a CONNECT to the authority."""
    for var in ("HTTPS_PROXY", "https_proxy"):
        p = Proxy(ctx)
        d = ctx.daemon(env={var: p.url()})
        assert_token_ok(get_token(d.port))
        assert ctx.fake.calls(d.tenant) == 1, f"{var}: the fake saw {ctx.fake.calls(d.tenant)} calls"
        recs = p.records()
        assert len(recs) >= 1, f"{var}: the proxy saw no CONNECT; imdsd went direct"
        r = recs[0]
        assert r["method"] == "CONNECT" and r["target"] == f"localhost:{ctx.fake.port}", r
        assert r["status"] == 200 and r["auth"] == "not_required" and not r["auth_header"], r
        assert r["host_header"] == f"localhost:{ctx.fake.port}", f"CONNECT Host header {r['host_header']!r}"
        assert all(x["target"] == r["target"] for x in recs)


def test_proxy_with_credentials(ctx):
    """user:password in the URL (percent-decoded) -> Proxy-Authorization: Basic; the password never in
    the log, even at debug."""
    cases = [(USER, PASSWORD, PASSWORD),
             ("svc@corp", "p@ss:w/rd%", "p%40ss%3Aw%2Frd%25")]   # percent-encoded in the URL
    for user, password, encoded in cases:
        p = Proxy(ctx, "--require-auth", f"{user}:{password}")
        url = p.url(user.replace("@", "%40"), encoded)
        d = ctx.daemon(env={"HTTPS_PROXY": url}, log_level="debug")
        assert_token_ok(get_token(d.port))
        recs = p.records()
        assert recs and all(x["auth"] == "ok" and x["status"] == 200 for x in recs), \
            f"the proxy did not accept imdsd's credentials: {recs}"
        assert recs[0]["target"] == f"localhost:{ctx.fake.port}"
        assert ctx.fake.calls(d.tenant) == 1
        assert_no_secret(ctx, d, password, encoded, basic(user, password))
        shown = [x.get("proxy") for x in log_events(d.log()) if x.get("proxy")]
        assert all("***" in x for x in shown), f"proxy shown with credentials in the log: {shown}"


def test_proxy_refusing(ctx):
    """The proxy says 403, or 407 to wrong credentials: 503 JSON, Entra never reached, the log line
    names the proxy with the password masked."""
    for how, args, password in (("403", ["--refuse", "403"], PASSWORD),
                                ("407", ["--require-auth", f"{USER}:right-one"], PASSWORD)):
        p = Proxy(ctx, *args)
        d = ctx.daemon(env={"HTTPS_PROXY": p.url(USER, password)}, extra=["--entra-timeout", "3"],
                       log_level="debug")
        t0 = time.time()
        r = get_token(d.port, timeout=30)
        took = time.time() - t0
        assert_json_error(r, 503)
        assert took <= 3 + 1.5 * ctx.scale, f"{how}: answered after {took:.1f}s with --entra-timeout 3"
        assert ctx.fake.calls(d.tenant) == 0, f"{how}: Entra was reached around a refusing proxy"
        recs = p.records()
        assert recs and all(x["status"] == int(how) for x in recs), f"{how}: proxy log {recs}"
        if how == "407":
            assert all(x["auth"] == "wrong" for x in recs), recs
        refused = log_events(d.log(), "https_proxy_refused")
        assert refused, f"{how}: no event=https_proxy_refused in the log"
        want = f"http://{USER}:***@127.0.0.1:{p.port}"
        assert all(x.get("proxy") == want for x in refused), \
            f"{how}: proxy={[x.get('proxy') for x in refused]}, want {want}"
        assert_no_secret(ctx, d, password, basic(USER, password))
        assert password not in r.body.decode(errors="replace"), "the password reached the client"


def test_no_proxy_bypass(ctx):
    """NO_PROXY / no_proxy naming the authority host: direct. Entries that do not match it (another
    domain, another port, the loopback address that localhost resolves to): through the proxy."""
    port = ctx.fake.port
    cases = [({"NO_PROXY": "localhost"}, False),
             ({"no_proxy": "localhost"}, False),
             ({"NO_PROXY": "example.com, .localhost"}, False),
             ({"NO_PROXY": f"localhost:{port}"}, False),
             ({"NO_PROXY": "*"}, False),
             ({"NO_PROXY": "example.com"}, True),
             ({"NO_PROXY": f"localhost:{port + 1 if port < 65535 else port - 1}"}, True),
             ({"NO_PROXY": "127.0.0.1"}, True)]       # names are never resolved
    p = Proxy(ctx)
    for env, proxied in cases:
        before = len(p.records())
        d = ctx.daemon(env=dict(env, HTTPS_PROXY=p.url()))
        assert_token_ok(get_token(d.port))
        assert ctx.fake.calls(d.tenant) == 1
        n = len(p.records()) - before
        if proxied:
            assert n >= 1, f"{env}: imdsd bypassed the proxy"
        else:
            assert n == 0, f"{env}: imdsd went through the proxy ({n} CONNECTs)"
        d.stop()


def test_malformed_https_proxy_exit_2(ctx):
    """A proxy URL imdsd cannot use: exit 2 and one line that names the variable and shows the URL
    with the password replaced by ***."""
    port = 18000
    args = ctx.daemon_args(ctx.tenant(), ctx.token(), port)
    secret = "Hunter2pw"
    bad = [f"http://{USER}:{secret}@127.0.0.1:99999",           # port out of range
           f"http://{USER}:{secret}@127.0.0.1:80a",             # port not a number
           f"https://{USER}:{secret}@proxy.example:3128",       # TLS to the proxy: not supported
           f"socks5://{USER}:{secret}@proxy.example:1080",      # other scheme
           f"http://{USER}:{secret}@proxy.example:3128/path",   # a path
           f"http://{USER}:{secret}@",                          # no host
           f"http://{USER}:{secret}@[::1:3128",                 # unterminated IPv6 literal
           f"http://{USER}:{secret}@proxy_ex ample:3128",       # a space
           f"http://{USER}:{secret}%zz@proxy.example:3128",     # a bad %-escape
           f"http://{USER}:{secret}@pro/xy@proxy.example:3128",  # '@' and '/' in the password, unencoded
           f"{USER}:{secret}@proxy.example:3128/?next=http://x"]  # no scheme (taken as http), "://" later on
    for var in ("HTTPS_PROXY", "https_proxy"):
        for url in bad:
            rc, out, err = ctx.run(args, env={var: url})
            lines = [l for l in err.splitlines() if l.strip()]
            assert rc == 2, f"{var}={url!r}: exit {rc}, want 2 (stderr {err[:300]!r})"
            assert len(lines) == 1, f"{var}={url!r}: {len(lines)} lines on stderr: {err[:500]!r}"
            assert out == "", f"{var}={url!r}: stdout {out[:200]!r}"
            line = lines[0]
            assert var in line, f"{var}={url!r}: the message does not name {var}: {line!r}"
            assert secret not in line, f"{var}={url!r}: the password is in the message: {line!r}"
            assert f"{USER}:***@" in line, f"{var}={url!r}: the redacted URL is not in the message: {line!r}"
    # the upper-case variable wins when both are set; an empty one does not count
    rc, _, err = ctx.run(args, env={"HTTPS_PROXY": bad[0], "https_proxy": "http://127.0.0.1:3128"})
    assert rc == 2 and "HTTPS_PROXY" in err and secret not in err, err
    rc, _, err = ctx.run(args, env={"HTTPS_PROXY": "", "https_proxy": bad[2]})
    assert rc == 2 and "https_proxy" in err and secret not in err, err
