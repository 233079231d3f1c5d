"""AKS identity bindings: the token exchange through AZURE_KUBERNETES_TOKEN_PROXY, as azidentity
(sdk/azidentity/internal/customtokenproxy) sends it.

The stand-in Entra plays the binding's token proxy: it serves the token endpoint under a path
prefix (--path-prefix), with a certificate for tokenproxy.aks.test from a CA of its own (aks-ca,
and aks-ca2 after a rotation: --alt-cert), and records the SNI name, Host header and path of every
token request. imdsd connects to localhost:PORT, sends SNI tokenproxy.aks.test, trusts only the
binding's CA (not --ca-file), and still names Entra's host in the Host header. The CA file lives in
a volume written the kubelet's way (a ..data swap), as the webhook's projected ca-cert/ca.crt is.
"""
import os

from harness import (CLIENT_ID, RESOURCE, Fake, KubeletToken, assert_json_error, assert_token_ok, concurrently,
                     get_token, log_events)

SNI = "tokenproxy.aks.test"
PREFIX = "/identitybindings/ns1"
AUTHORITY = "https://login.microsoftonline.com/"


class KubeletFile(KubeletToken):
    """One file of a projected volume (rel: its path in the volume), rotated as the kubelet does."""

    def __init__(self, root, rel, content):
        self.root, self.nested, self.mode = root, True, 0o644
        self.rel, self.path = rel, os.path.join(root, rel)
        self.content, self.gen, self.rotations = None, 0, []
        self.rotate(content)


def pem(ctx, name):
    with open(ctx.certs[name], "rb") as f:
        return f.read()


def proxy_fake(ctx, cert="aks-proxy", alt="aks-proxy2", prefix=PREFIX):
    """A stand-in Entra behind the binding's token proxy URL; stopped by Ctx.finish."""
    ctx.n += 1
    extra = ["--path-prefix", prefix] if prefix else []
    if alt:
        extra += ["--alt-cert", ctx.certs[f"{alt}.pem"], "--alt-key", ctx.certs[f"{alt}.key"]]
    fake = Fake(ctx.tmp, f"aks-{ctx.n}", ctx.certs[f"{cert}.pem"], ctx.certs[f"{cert}.key"], extra=extra)
    ctx.cleanups.append(fake.stop)
    return fake


def binding_daemon(ctx, fake, env, extra=(), start=True):
    """imdsd as the webhook leaves it in an identity-binding pod: the AZURE_KUBERNETES_* variables,
    Entra's public authority (never contacted), --ca-file the test CA (which must not be used)."""
    tenant, tok = ctx.tenant("ok"), ctx.token()
    d = ctx.daemon(tenant, tok, fake=fake, env=env, extra=list(extra) + ["--entra-timeout", "3"], start=False)
    d.args[d.args.index("--authority-host") + 1] = AUTHORITY
    if start:
        d.start()
    return d


def ca_file_binding(ctx, fake, url_tail=""):
    """The webhook's variables for a binding whose CA is a file of a kubelet-written volume (aks-ca
    in it): (the KubeletFile, the environment)."""
    ca = KubeletFile(os.path.join(ctx.tmp, "wi"), "ca-cert/ca.crt", pem(ctx, "aks-ca.pem"))
    return ca, {"AZURE_KUBERNETES_TOKEN_PROXY": f"https://localhost:{fake.port}{PREFIX}{url_tail}",
                "AZURE_KUBERNETES_SNI_NAME": SNI, "AZURE_KUBERNETES_CA_FILE": ca.path}


def records(fake, d):
    return [r for r in fake.records(d.tenant) if r["status"] == 200]


def test_token_proxy_exchange(ctx):
    """The request goes to the proxy's host, port and path, with the SNI name and Entra's Host."""
    fake = proxy_fake(ctx)
    ca, env = ca_file_binding(ctx, fake)
    d = binding_daemon(ctx, fake, env)
    r = get_token(d.port)
    assert_token_ok(r)
    (rec,) = records(fake, d)
    assert rec["sni"] == SNI, rec
    assert rec["path"] == f"{PREFIX}/{d.tenant}/oauth2/v2.0/token", rec
    assert rec["host"] == "login.microsoftonline.com", rec
    assert rec["form_ok"] and rec["client_id"] == CLIENT_ID and rec["scope"] == RESOURCE + "/.default", rec
    assert r.json["access_token"] == rec["access_token"]
    assert ctx.fake.records(d.tenant) == [], "the --authority-host's stand-in was asked"
    (started,) = log_events(d.log(), "token_proxy")
    assert started["url"] == f"https://localhost:{fake.port}{PREFIX}" and started["sni_name"] == SNI, started
    assert started["ca"] == ca.path, started


def test_token_proxy_ca_file_rotation(ctx):
    """AZURE_KUBERNETES_CA_FILE is read before every exchange: a new CA replaces the old one (and the
    connections verified against it), an empty file keeps it, a bad or missing one fails the
    exchange with a reason and nothing else."""
    fake = proxy_fake(ctx)
    ca, env = ca_file_binding(ctx, fake, url_tail="/")
    d = binding_daemon(ctx, fake, env)

    def token(n):
        return get_token(d.port, resource=f"https://r{n}.example.com")

    assert_token_ok(token(1), resource="https://r1.example.com")
    first = records(fake, d)[-1]
    assert first["path"] == f"{PREFIX}/{d.tenant}/oauth2/v2.0/token", first   # the URL's '/' is not doubled

    # The binding's CA rotates: the file now holds aks-ca2, the proxy presents a certificate from it.
    ca.rotate(pem(ctx, "aks-ca2.pem"))
    fake.serve("alt")
    assert_token_ok(token(2), resource="https://r2.example.com")
    second = records(fake, d)[-1]
    assert second["conn"] != first["conn"], "the connection verified against the old CA was reused"
    changed = log_events(d.log(), "token_proxy_ca_changed")
    assert len(changed) == 1 and changed[0]["certificates"] == "1", changed

    # Mid-rotation the file is empty: the CA in use stays.
    with open(ca.path, "wb"):
        pass
    assert_token_ok(token(3), resource="https://r3.example.com")
    assert log_events(d.log(), "token_proxy_ca_empty"), "an empty CA file was not noticed"

    # The old CA back in the file while the proxy keeps aks-ca2's certificate: only the file's CA
    # is trusted, so the handshake fails, and the client is told why.
    ca.rotate(pem(ctx, "aks-ca.pem"))
    r = token(4)
    assert_json_error(r, r.status)
    assert r.status in (502, 503, 504), r
    desc = r.json["error_description"]
    assert "certificate verification failed" in desc and SNI in desc and f"localhost:{fake.port}" in desc, desc

    # Not a CA: the exchange fails naming the file; imdsd serves what it has and stays healthy.
    ca.rotate(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    r = token(5)
    assert r.status in (502, 503, 504), r
    assert "AZURE_KUBERNETES_CA_FILE" in r.json["error_description"] and ca.path in r.json["error_description"]
    assert log_events(d.log(), "token_proxy_ca_invalid")
    assert_token_ok(token(1), resource="https://r1.example.com")   # cached

    # Gone: the exchange fails with the read error.
    ca.remove_data()
    r = token(6)
    assert r.status in (502, 503, 504), r
    assert "Cannot read AZURE_KUBERNETES_CA_FILE" in r.json["error_description"], r.json

    # Back: the next exchange works again, with the CA the file holds now.
    ca.rotate(pem(ctx, "aks-ca2.pem"))
    assert_token_ok(token(7), resource="https://r7.example.com")
    assert d.proc.poll() is None


def test_token_proxy_ca_file_many_at_once(ctx):
    """Exchanges that start together share the CA file's reads: 24 resources at once, each served."""
    fake = proxy_fake(ctx)
    ca, env = ca_file_binding(ctx, fake)
    d = binding_daemon(ctx, fake, env)
    n = 24
    results = concurrently(n, lambda i: get_token(d.port, resource=f"https://many{i}.example.com"))
    for i, r in enumerate(results):
        assert not isinstance(r, BaseException), r
        assert_token_ok(r, resource=f"https://many{i}.example.com")
    assert len(records(fake, d)) == n
    assert {r["sni"] for r in records(fake, d)} == {SNI}


def test_token_proxy_ca_data_and_default_sni(ctx):
    """AZURE_KUBERNETES_CA_DATA instead of a file; without AZURE_KUBERNETES_SNI_NAME the proxy's host
    is the name sent and verified; a path-less proxy URL keeps the token endpoint's path."""
    fake = proxy_fake(ctx, cert="aks-local", alt=None, prefix="")
    env = {"AZURE_KUBERNETES_TOKEN_PROXY": f"https://localhost:{fake.port}",
           "AZURE_KUBERNETES_CA_DATA": pem(ctx, "aks-ca.pem").decode()}
    d = binding_daemon(ctx, fake, env)
    assert_token_ok(get_token(d.port))
    (rec,) = records(fake, d)
    assert rec["sni"] == "localhost" and rec["path"] == f"/{d.tenant}/oauth2/v2.0/token", rec
    assert log_events(d.log(), "token_proxy")[0]["ca"] == "AZURE_KUBERNETES_CA_DATA"

    # The same proxy with SNI tokenproxy.aks.test: its certificate does not name it.
    env2 = dict(env, AZURE_KUBERNETES_SNI_NAME=SNI)
    d2 = binding_daemon(ctx, fake, env2)
    r = get_token(d2.port)
    assert r.status in (502, 503, 504) and "certificate verification failed" in r.json["error_description"], r
    assert records(fake, d2) == []


def test_token_proxy_trusts_only_the_binding_ca(ctx):
    """With a binding CA, --ca-file (here the CA of the proxy's certificate) is not trusted."""
    fake = proxy_fake(ctx, cert="leaf", alt=None)   # signed by the test CA that --ca-file names
    env = {"AZURE_KUBERNETES_TOKEN_PROXY": f"https://localhost:{fake.port}{PREFIX}",
           "AZURE_KUBERNETES_CA_DATA": pem(ctx, "aks-ca.pem").decode()}
    d = binding_daemon(ctx, fake, env)
    r = get_token(d.port)
    assert r.status in (502, 503, 504), r
    assert "certificate verification failed for localhost" in r.json["error_description"], r.json
    assert records(fake, d) == []
    # Without a binding CA, the trust anchors are --ca-file's (the system's by default).
    d2 = binding_daemon(ctx, fake, {"AZURE_KUBERNETES_TOKEN_PROXY": env["AZURE_KUBERNETES_TOKEN_PROXY"]})
    assert_token_ok(get_token(d2.port))
    assert len(records(fake, d2)) == 1


def test_token_proxy_bad_settings(ctx):
    """azidentity's refusals, each one line naming the variable, and a non-zero exit."""
    ca = ctx.certs["aks-ca.pem"]
    empty = os.path.join(ctx.tmp, "empty.crt")
    open(empty, "w").close()
    cases = [
        ({"AZURE_KUBERNETES_TOKEN_PROXY": "http://localhost:8443"}, "AZURE_KUBERNETES_TOKEN_PROXY", "https://"),
        ({"AZURE_KUBERNETES_TOKEN_PROXY": "https://user:pw@localhost:8443"}, "AZURE_KUBERNETES_TOKEN_PROXY",
         "user name"),
        ({"AZURE_KUBERNETES_TOKEN_PROXY": "https://localhost:8443/p?x=1"}, "AZURE_KUBERNETES_TOKEN_PROXY", "query"),
        ({"AZURE_KUBERNETES_TOKEN_PROXY": "https://localhost:8443/p#f"}, "AZURE_KUBERNETES_TOKEN_PROXY", "fragment"),
        ({"AZURE_KUBERNETES_SNI_NAME": SNI}, "AZURE_KUBERNETES_SNI_NAME", "AZURE_KUBERNETES_TOKEN_PROXY is not"),
        ({"AZURE_KUBERNETES_CA_FILE": ca}, "AZURE_KUBERNETES_CA_FILE", "AZURE_KUBERNETES_TOKEN_PROXY is not"),
        ({"AZURE_KUBERNETES_CA_DATA": "x"}, "AZURE_KUBERNETES_CA_DATA", "AZURE_KUBERNETES_TOKEN_PROXY is not"),
        ({"AZURE_KUBERNETES_TOKEN_PROXY": "https://localhost:8443", "AZURE_KUBERNETES_CA_FILE": ca,
          "AZURE_KUBERNETES_CA_DATA": open(ca).read()}, "AZURE_KUBERNETES_CA_FILE", "both set"),
        ({"AZURE_KUBERNETES_TOKEN_PROXY": "https://localhost:8443", "AZURE_KUBERNETES_CA_FILE": "/nonexistent/ca.crt"},
         "AZURE_KUBERNETES_CA_FILE '/nonexistent/ca.crt'", "No such file"),
        ({"AZURE_KUBERNETES_TOKEN_PROXY": "https://localhost:8443", "AZURE_KUBERNETES_CA_FILE": empty},
         "AZURE_KUBERNETES_CA_FILE", "empty"),
        ({"AZURE_KUBERNETES_TOKEN_PROXY": "https://localhost:8443", "AZURE_KUBERNETES_CA_DATA": "not a pem"},
         "AZURE_KUBERNETES_CA_DATA", "no usable certificates"),
        ({"AZURE_KUBERNETES_TOKEN_PROXY": "https://localhost:8443", "AZURE_KUBERNETES_SNI_NAME": "bad name"},
         "AZURE_KUBERNETES_SNI_NAME", "not a DNS name"),
    ]
    tok = ctx.token()
    base_args = ["--client-id", CLIENT_ID, "--tenant-id", "t", "--token-file", tok.path]
    for env, setting, why in cases:
        rc, out, err = ctx.run(base_args, env=env)
        lines = err.strip().splitlines()
        assert rc != 0 and len(lines) == 1, (env, rc, err)
        assert lines[0].startswith("imdsd: ") and setting in lines[0] and why in lines[0], (env, lines)
        assert "BEGIN CERTIFICATE" not in err, "the CA data was echoed"


def test_token_proxy_through_https_proxy(ctx):
    """HTTPS_PROXY applies to the token proxy, as Go's transport does: CONNECT goes to its host and
    port, and TLS inside the tunnel is verified as the SNI name."""
    from test_proxy import Proxy
    proxy = Proxy(ctx)
    fake = proxy_fake(ctx)
    env = {"AZURE_KUBERNETES_TOKEN_PROXY": f"https://localhost:{fake.port}{PREFIX}",
           "AZURE_KUBERNETES_SNI_NAME": SNI, "AZURE_KUBERNETES_CA_DATA": pem(ctx, "aks-ca.pem").decode(),
           "HTTPS_PROXY": proxy.url()}
    d = binding_daemon(ctx, fake, env)
    assert_token_ok(get_token(d.port))
    assert [r["target"] for r in proxy.records()] == [f"localhost:{fake.port}"], proxy.records()
    (rec,) = records(fake, d)
    assert rec["sni"] == SNI, rec
