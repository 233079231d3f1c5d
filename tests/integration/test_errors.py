"""Request validation and the mapping of Entra failures to IMDS errors."""
import os
import time

from harness import (CLIENT_ID, RESOURCE, TOKEN_PATH, assert_json_error, assert_token_ok, get_token, log_events,
                     parse_raw, raw_exchange, request, token_url)

NO_HEADER = {"error": "invalid_request", "error_description": "Required metadata header not specified"}


def test_no_metadata_header(ctx):
    d = ctx.daemon()
    probes = [token_url(),                               # PY13 / .NET probe: full request, no header
              TOKEN_PATH,                                # JS4 / Go probe: no query at all
              token_url(resource=None)]                  # MSAL.NET IMDSv1 discovery
    for path in probes:
        t0 = time.monotonic()
        r = request(d.port, path, {})
        assert_json_error(r, 400)
        assert r.json == NO_HEADER, f"{path}: {r.json}"
        assert time.monotonic() - t0 < 1 * ctx.scale, "probe answer took over 1 s"
    for value in ("false", "1", "", "yes"):
        assert_json_error(request(d.port, token_url(), {"Metadata": value}), 400, "invalid_request")
    assert ctx.fake.calls(d.tenant) == 0, "Entra was contacted for a request without Metadata: true"


def test_x_forwarded_for_rejected(ctx):
    d = ctx.daemon()
    r = get_token(d.port, headers={"Metadata": "true", "X-Forwarded-For": "10.0.0.7"})
    assert_json_error(r, 400, "invalid_request")
    assert ctx.fake.calls(d.tenant) == 0


def test_missing_resource(ctx):
    d = ctx.daemon()
    r = get_token(d.port, resource=None)
    assert_json_error(r, 400, "invalid_request", "Required query variable 'resource' is missing")
    assert ctx.fake.calls(d.tenant) == 0


def test_missing_api_version(ctx):
    d = ctx.daemon()
    assert_json_error(get_token(d.port, api_version=None), 400, "invalid_request")
    assert ctx.fake.calls(d.tenant) == 0


def test_bad_percent_encoding(ctx):
    d = ctx.daemon()
    for q in ("resource=%zz", "resource=https%3A%2F%2Fx%4", "resource=abc%4g", "resource=%",
              "resource=https://x/&x=%G1"):
        r = request(d.port, f"{TOKEN_PATH}?api-version=2018-02-01&{q}", {"Metadata": "true"})
        assert r.status == 400, f"{q}: {r!r}"
        assert_json_error(r, 400)
    assert ctx.fake.calls(d.tenant) == 0


def test_duplicate_query_parameter(ctx):
    d = ctx.daemon()
    for extra in ("&resource=https://vault.azure.net", "&api-version=2018-02-01", f"&client_id={CLIENT_ID}"
                  f"&client_id={CLIENT_ID}"):
        r = request(d.port, token_url(extra=extra), {"Metadata": "true"})
        assert r.status == 400, f"duplicate {extra}: {r!r}"
        assert_json_error(r, 400, "invalid_request")
    assert ctx.fake.calls(d.tenant) == 0


def test_unknown_client_id(ctx):
    d = ctx.daemon()
    r = get_token(d.port, client_id="00000000-dead-beef-0000-000000000000")
    assert_json_error(r, 400, "invalid_request", "Identity not found")
    assert ctx.fake.calls(d.tenant) == 0


def test_other_identity_selectors_rejected(ctx):
    d = ctx.daemon()
    for extra in ("&object_id=7f3c0000-0000-0000-0000-000000000001",
                  "&msi_res_id=/subscriptions/x/resourceGroups/y/providers/Microsoft.ManagedIdentity/"
                  "userAssignedIdentities/z",
                  "&mi_res_id=/subscriptions/x/resourcegroups/y/providers/Microsoft.ManagedIdentity/"
                  "userAssignedIdentities/z"):
        for cid in (None, CLIENT_ID):
            r = request(d.port, token_url(client_id=cid, extra=extra), {"Metadata": "true"})
            assert_json_error(r, 400, "invalid_request", "Identity not found")
    assert ctx.fake.calls(d.tenant) == 0


def test_unknown_paths_404(ctx):
    d = ctx.daemon()
    cases = [("/metadata/identity/getplatformmetadata?cred-api-version=2.0", {}),  # MSAL.NET IMDSv2 probe
             ("/metadata/identity/getplatformmetadata?cred-api-version=2.0", {"Metadata": "true"}),
             ("/metadata/instance?api-version=2021-02-01", {"Metadata": "true"}),
             ("/metadata/identity/issuecredential", {"Metadata": "true"}),
             ("/metadata/identity/oauth2/tokens?api-version=2018-02-01&resource=x", {"Metadata": "true"}),
             ("/", {}), ("/favicon.ico", {})]
    for path, h in cases:
        r = request(d.port, path, h)
        assert r.status == 404, f"{path} {h}: {r!r}"
        assert_json_error(r, 404)
        # the rest of IMDS (which the proxy sidecar forwarded to the node): said to be not served
        want = ("imdsd serves only managed identity tokens (/metadata/identity/oauth2/token), no other "
                "instance metadata" if path.startswith("/metadata/") else "The requested path was not found")
        assert r.json["error_description"] == want, (path, r.json)
    assert ctx.fake.calls(d.tenant) == 0


def test_non_get_405(ctx):
    """Methods other than GET get 405; POST is the Cloud Shell protocol (test_cloud_shell.py), which
    without its form body is a 400."""
    d = ctx.daemon()
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        r = request(d.port, token_url(), {"Metadata": "true"}, method=method)
        assert r.status == 405, f"{method}: {r!r}"
        assert_json_error(r, 405)
    r = request(d.port, token_url(), {"Metadata": "true"}, method="POST")
    assert_json_error(r, 400, "invalid_request",
                      "A POST token request needs an application/x-www-form-urlencoded body")
    assert ctx.fake.calls(d.tenant) == 0


# ---- Entra said no for good: 400 with Entra's error, no Retry-After, no retry storm -------------------

def entra_permanent(ctx, code, error):
    d = ctx.daemon(ctx.tenant(f"aadsts-{code}"))
    r = get_token(d.port)
    assert_json_error(r, 400, error, f"AADSTS{code}")
    assert "retry-after" not in r.headers, "a 400 must not carry Retry-After"
    assert 1 <= ctx.fake.calls(d.tenant) <= 2, f"{ctx.fake.calls(d.tenant)} Entra calls for a permanent error"


def test_entra_700016_app_not_found(ctx):
    entra_permanent(ctx, 700016, "unauthorized_client")


def test_entra_90002_tenant_not_found(ctx):
    entra_permanent(ctx, 90002, "invalid_request")


def test_entra_500011_resource_not_found(ctx):
    entra_permanent(ctx, 500011, "invalid_resource")


def test_entra_70011_invalid_scope(ctx):
    entra_permanent(ctx, 70011, "invalid_scope")


# ---- transient: 5xx JSON, never 400, no token; bounded by --entra-timeout --------------------------

def entra_transient(ctx, behaviour, timeout=3):
    d = ctx.daemon(ctx.tenant(behaviour), extra=["--entra-timeout", str(timeout)])
    t0 = time.monotonic()
    r = get_token(d.port, timeout=30)
    took = time.monotonic() - t0
    assert r.status in (500, 502, 503, 504), f"Entra {behaviour} -> {r!r}, want 5xx"
    assert_json_error(r, r.status)
    assert took < (timeout + 3) * ctx.scale, f"answer took {took:.1f}s with --entra-timeout {timeout}"
    assert ctx.fake.calls(d.tenant) >= 1, "the fake was never called"
    assert request(d.port, "/healthz").status == 200
    return d


def test_entra_http500(ctx):
    entra_transient(ctx, "http500")


def test_entra_http503(ctx):
    entra_transient(ctx, "http503")


def test_entra_garbage_body(ctx):
    entra_transient(ctx, "garbage")


def test_entra_2mib_body(ctx):
    entra_transient(ctx, "big")


def test_entra_connection_reset(ctx):
    entra_transient(ctx, "reset")


def test_entra_truncated_body(ctx):
    entra_transient(ctx, "truncated")


def test_entra_200_without_access_token(ctx):
    entra_transient(ctx, "nojson-token")


def test_entra_70021_is_transient(ctx):
    entra_transient(ctx, "aadsts-70021")


def test_entra_700024_is_transient(ctx):
    entra_transient(ctx, "aadsts-700024")


def test_entra_timeout(ctx):
    entra_transient(ctx, "slow-10", timeout=2)


def test_entra_429_retry_after(ctx):
    d = ctx.daemon(ctx.tenant("http429"), extra=["--entra-timeout", "3"])
    r = get_token(d.port, timeout=30)
    assert_json_error(r, 429)
    ra = r.headers.get("retry-after")
    assert ra is not None and ra.isdigit() and int(ra) >= 1, f"Retry-After {ra!r} is not integer seconds"


def test_transient_failure_not_sticky(ctx):
    tenant = ctx.tenant("ok")
    ctx.fake.control(tenant, script=["http503"])   # the first Entra call fails, later ones succeed
    d = ctx.daemon(tenant, extra=["--entra-timeout", "3"])
    statuses, deadline = [], time.monotonic() + 8 * ctx.scale
    while time.monotonic() < deadline:
        r = get_token(d.port, timeout=30)
        statuses.append(r.status)
        if r.status == 200:
            break
        assert r.status >= 500, f"transient Entra failure answered {r!r}"
        time.sleep(0.5)
    assert statuses[-1] == 200, f"never recovered: statuses {statuses}"
    j = assert_token_ok(r)
    oks = [x for x in ctx.fake.records(tenant) if x["status"] == 200]
    assert oks and j["access_token"] == oks[-1]["access_token"]
    assert ctx.fake.calls(tenant) >= 2


def raw_token_request(port, head, body=b""):
    """One raw request for the token (head: the lines after the request line, each ending CRLF)."""
    data = f"GET {token_url()} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode() + body
    got, _ = raw_exchange(port, data, timeout=10, one_response=True)
    r = parse_raw(got)
    assert r is not None, f"no HTTP answer to {data[:120]!r}"
    return r


def test_metadata_only_counts_in_the_header_section(ctx):
    """A client that can add a trailer but not a header (a forged request's chunked body) cannot
    satisfy the Metadata check with it; nor send a token request with a body at all."""
    d = ctx.daemon()
    r = raw_token_request(d.port, "Transfer-Encoding: chunked\r\n", b"0\r\nMetadata: true\r\n\r\n")
    assert_json_error(r, 400, "invalid_request", "metadata header")
    r = raw_token_request(d.port, "Metadata: true\r\nTransfer-Encoding: chunked\r\n",
                          b"5\r\nhello\r\n0\r\nMetadata: true\r\n\r\n")
    assert_json_error(r, 400, "invalid_request", "must not have a body")
    r = raw_token_request(d.port, "Metadata: true\r\nContent-Length: 5\r\n", b"hello")
    assert_json_error(r, 400, "invalid_request", "must not have a body")
    assert ctx.fake.calls(d.tenant) == 0, "Entra was asked for a token"
    # an empty body is no body: what some clients send with a GET
    assert_token_ok(raw_token_request(d.port, "Metadata: true\r\nContent-Length: 0\r\n"))
    assert_token_ok(raw_token_request(d.port, "Metadata: true\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"))


def test_dns_rebinding_hosts_refused(ctx):
    """A web page whose name was rebound to 127.0.0.1 is same-origin with imdsd for the browser and
    may send Metadata: true. Token requests whose Host is a name other than localhost (or one
    allowed with --allow-host) are refused; IP literals stay allowed, and the probes do not care."""
    secret = os.path.join(ctx.tmp, "identity-header")
    with open(secret, "w") as f:
        f.write("a-shared-secret\n")
    d = ctx.daemon(extra=["--allow-host", "imdsd.internal", "--identity-header-file", secret])
    md = {"Metadata": "true"}
    for host in ("attacker.example", f"attacker.example:{d.port}", f"evil.localhost:{d.port}",
                 "127.0.0.1.nip.io", f"imdsd.internal.attacker.example:{d.port}"):
        r = request(d.port, token_url(), dict(md, Host=host))
        j = assert_json_error(r, 403, "forbidden", "--allow-host")
        assert "unreachable" not in j["error_description"]
        r = request(d.port, "/msi/token?api-version=2019-08-01&resource=" + RESOURCE,
                    {"X-IDENTITY-HEADER": "a-shared-secret", "Host": host})
        assert r.status == 403, f"/msi/token with Host {host}: {r!r}"
    assert ctx.fake.calls(d.tenant) == 0
    for host in (f"127.0.0.1:{d.port}", "169.254.169.254", f"localhost:{d.port}", f"LOCALHOST.:{d.port}",
                 "[::1]:80", "imdsd.internal", f"IMDSD.Internal:{d.port}"):
        assert_token_ok(request(d.port, token_url(), dict(md, Host=host)))
    assert request(d.port, "/healthz", {"Host": "attacker.example"}).status == 200
    events = log_events(d.log(), "request_host_refused")
    assert len(events) == 1 and events[0]["host"] == "attacker.example", events
    got, closed = raw_exchange(d.port, f"GET {token_url()} HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n"
                                       "Metadata: true\r\n\r\n".encode(), timeout=5)
    assert_json_error(parse_raw(got), 400)
    assert closed
