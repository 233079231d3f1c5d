"""The token endpoint's main path: shape of the 200, the Entra form, caching, routing, readiness."""
import http.client
import os
import time

import socket

from harness import (CLIENT_ID, JSON_CT, RESOURCE, TOKEN_PATH, assert_token_ok, concurrently, get_token,
                     parse_raw, raw_get, read_responses, request, token_url, wait_for)

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
OTHER_ID = "99999999-8888-7777-6666-555555555555"


def ok_records(ctx, tenant):
    return [r for r in ctx.fake.records(tenant) if r["status"] == 200]


def test_token_basic(ctx):
    d = ctx.daemon()
    t0 = time.time()
    j = assert_token_ok(get_token(d.port))
    recs = ctx.fake.records(d.tenant)
    assert len(recs) == 1, f"fake saw {len(recs)} token requests, want 1"
    rec = recs[0]
    assert rec["form_ok"], f"Entra form rejected: {rec['problems']}"
    assert rec["client_id"] == CLIENT_ID, rec["client_id"]
    assert rec["grant_type"] == "client_credentials", rec["grant_type"]
    assert rec["client_assertion_type"] == JWT_BEARER, rec["client_assertion_type"]
    assert rec["scope"] == "https://management.azure.com//.default", f"scope {rec['scope']!r} (must be verbatim)"
    assert rec["assertion_sha256"] == d.token.sha256, "client_assertion is not the token file's content"
    assert j["access_token"] == rec["access_token"], "served access_token is not the one Entra issued"
    expires_on = int(j["expires_on"])
    assert abs(expires_on - (t0 + 3599)) <= 3, f"expires_on {expires_on} is not ~now+3599 ({t0 + 3599:.0f})"
    assert 3590 <= int(j["expires_in"]) <= 3599, f"expires_in {j['expires_in']}"
    assert abs(int(j["expires_in"]) - (expires_on - time.time())) <= 2, "expires_in != expires_on - now"
    assert 3590 <= int(j["ext_expires_in"]) <= 3599, f"ext_expires_in {j['ext_expires_in']}"
    assert abs(int(j["not_before"]) - t0) <= 10, f"not_before {j['not_before']} is not ~now ({t0:.0f})"


def test_resource_variants_and_scope(ctx):
    d = ctx.daemon()
    resources = ["https://vault.azure.net", "https://storage.azure.com/", "00000003-0000-0000-c000-000000000000",
                 "api://a1b2c3d4-0000-0000-0000-000000000000", "https://database.windows.net//"]
    for res in resources:
        assert_token_ok(get_token(d.port, res), resource=res)
    scopes = [r["scope"] for r in ctx.fake.records(d.tenant)]
    assert scopes == [r + "/.default" for r in resources], f"scopes sent: {scopes}"


def test_query_decoding(ctx):
    d = ctx.daemon()
    # lower-case hex, an unencoded value, and %2B (a literal '+')
    for raw, want in (("https%3a%2f%2fvault.azure.net", "https://vault.azure.net"),
                      ("https://vault.azure.net", "https://vault.azure.net"),
                      ("api%3A%2F%2Fa%2Bb", "api://a+b")):
        r = request(d.port, f"{TOKEN_PATH}?api-version=2018-02-01&resource={raw}", {"Metadata": "true"})
        assert_token_ok(r, resource=want)
    scopes = [r["scope"] for r in ctx.fake.records(d.tenant)]
    assert scopes == ["https://vault.azure.net/.default", "api://a+b/.default"], f"scopes sent: {scopes}"


def test_cache_hit_counts_down(ctx):
    d = ctx.daemon()
    j1 = assert_token_ok(get_token(d.port))
    time.sleep(1.1)
    j2 = assert_token_ok(get_token(d.port))
    assert ctx.fake.calls(d.tenant) == 1, f"fake saw {ctx.fake.calls(d.tenant)} calls, want 1 (cache miss?)"
    assert j2["access_token"] == j1["access_token"], "cached hit returned a different token"
    assert j2["expires_on"] == j1["expires_on"], f"expires_on changed {j1['expires_on']} -> {j2['expires_on']}"
    assert int(j2["expires_in"]) < int(j1["expires_in"]), \
        f"expires_in did not count down: {j1['expires_in']} then {j2['expires_in']}"
    assert abs(int(j2["expires_in"]) - (int(j2["expires_on"]) - time.time())) <= 2, "expires_in != expires_on - now"


def test_cache_keyed_by_client_and_resource(ctx):
    d = ctx.daemon(extra=["--allow-client-id", OTHER_ID])
    a = assert_token_ok(get_token(d.port, RESOURCE))
    b = assert_token_ok(get_token(d.port, "https://vault.azure.net"), resource="https://vault.azure.net")
    assert ctx.fake.calls(d.tenant) == 2
    assert a["access_token"] != b["access_token"]
    a2 = assert_token_ok(get_token(d.port, RESOURCE, client_id=CLIENT_ID))
    assert a2["access_token"] == a["access_token"], "explicit configured client_id missed the cache"
    assert ctx.fake.calls(d.tenant) == 2, "explicit configured client_id caused an Entra call"
    c = assert_token_ok(get_token(d.port, RESOURCE, client_id=OTHER_ID), client_id=OTHER_ID)
    assert c["access_token"] not in (a["access_token"], b["access_token"]), "other client got a cached token"
    recs = ctx.fake.records(d.tenant)
    assert [r["client_id"] for r in recs] == [CLIENT_ID, CLIENT_ID, OTHER_ID], [r["client_id"] for r in recs]
    c2 = assert_token_ok(get_token(d.port, RESOURCE, client_id=OTHER_ID), client_id=OTHER_ID)
    assert c2["access_token"] == c["access_token"] and ctx.fake.calls(d.tenant) == 3


def test_allow_client_id_repeatable(ctx):
    third = "33333333-3333-3333-3333-333333333333"
    d = ctx.daemon(extra=["--allow-client-id", OTHER_ID, "--allow-client-id", third])
    for cid in (OTHER_ID, third, CLIENT_ID):
        assert_token_ok(get_token(d.port, client_id=cid), client_id=cid)
    assert [r["client_id"] for r in ctx.fake.records(d.tenant)] == [OTHER_ID, third, CLIENT_ID]


def test_keepalive(ctx):
    d = ctx.daemon()
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10 * ctx.scale)
    try:
        r = get_token(d.port, conn=conn)
        assert_token_ok(r)
        sock = conn.sock
        assert sock is not None, "daemon closed the connection after a 200"
        for i in range(5):
            r = get_token(d.port, "https://vault.azure.net" if i % 2 else RESOURCE, conn=conn)
            assert r.status == 200, r
            assert request(d.port, "/healthz", conn=conn).status == 200
            assert conn.sock is sock, f"connection was not kept alive (request {i + 2})"
            assert r.headers.get("connection", "").lower() != "close"
    finally:
        conn.close()


def test_pipelined_and_split_requests(ctx):
    """Requests that arrive several in one segment, or one across many, are answered in order on one
    connection: a cold one (answered later, after the exchange) holding back the ones behind it."""
    d = ctx.daemon()
    cold = token_url("https://pipelined.example")
    s = socket.create_connection(("127.0.0.1", d.port), timeout=10 * ctx.scale)
    try:
        s.sendall(raw_get(cold) + raw_get("/healthz") + raw_get() + raw_get("/nope"))
        rs, _ = read_responses(s, 4, 20 * ctx.scale)
        assert [r.status for r in rs] == [200, 200, 200, 404], [(r.status, r.body[:80]) for r in rs]
        assert b"pipelined.example" in rs[0].body and b"vault.azure.net" not in rs[0].body
        assert b"access_token" in rs[2].body and b"pipelined.example" not in rs[2].body
        # one request byte by byte, then two with the boundary inside the second one's request line
        for b in raw_get():
            s.sendall(bytes([b]))
        two = raw_get() + raw_get("/healthz")
        s.sendall(two[:len(two) - 40])
        time.sleep(0.05)
        s.sendall(two[len(two) - 40:])
        rs, rest = read_responses(s, 3, 10 * ctx.scale)
        assert [r.status for r in rs] == [200, 200, 200] and rest.endswith(rs[-1].body), rs
        assert b"access_token" in rs[0].body and b"access_token" in rs[1].body
    finally:
        s.close()


def test_single_flight_200_cold_requests(ctx):
    tenant = ctx.tenant("slow-2")   # Entra takes 2 s, so all 200 requests wait on one fetch
    d = ctx.daemon(tenant)
    res = concurrently(200, lambda i: get_token(d.port, timeout=30), timeout=60)
    bad = [r for r in res if not hasattr(r, "status") or r.status != 200]
    assert not bad, f"{len(bad)} of 200 requests failed, e.g. {bad[:3]}"
    tokens = {r.json["access_token"] for r in res}
    assert len(tokens) == 1, f"{len(tokens)} different tokens served"
    assert ctx.fake.calls(tenant) == 1, f"fake saw {ctx.fake.calls(tenant)} calls for 200 cold requests, want 1"


test_single_flight_200_cold_requests.timeout = 90


def test_metadata_header_case_insensitive(ctx):
    d = ctx.daemon()
    for name, value in (("Metadata", "True"), ("metadata", "TRUE"), ("METADATA", "true")):
        r = get_token(d.port, headers={name: value})
        assert_token_ok(r)


def test_tolerant_routing(ctx):
    d = ctx.daemon()
    paths = [TOKEN_PATH + "/", "/" + TOKEN_PATH, "/METADATA/identity/oauth2/token",
             "/Metadata/Identity/OAuth2/Token/", "/metadata//identity/oauth2/token", TOKEN_PATH]
    tokens = set()
    for p in paths:
        r = request(d.port, token_url(path=p), {"Metadata": "true"})
        assert r.status == 200, f"{p}: {r!r}"
        tokens.add(assert_token_ok(r)["access_token"])
    assert len(tokens) == 1 and ctx.fake.calls(d.tenant) == 1


def test_client_extras_ignored(ctx):
    """What msal-node and friends add: extra query parameters and x-client headers."""
    d = ctx.daemon()
    h = {"Metadata": "true", "x-client-SKU": "msal.js.node", "x-client-Ver": "5.6.0", "Accept": "application/json",
         "x-ms-client-request-id": "5f4c4e2e-1111-2222-3333-444444444444", "User-Agent": "azsdk-js-identity/4.13.1"}
    r = request(d.port, token_url(extra="&xms_cc=CP1"), h)
    assert_token_ok(r)


def test_newer_api_versions_accepted(ctx):
    d = ctx.daemon()
    for v in ("2019-08-01", "2021-02-01", "2023-07-01"):
        assert_token_ok(get_token(d.port, api_version=v))



def test_short_lived_token_never_served_expired(ctx):
    d = ctx.daemon(ctx.tenant("ok-exp3"))
    t0 = time.time()
    j1 = assert_token_ok(get_token(d.port))
    assert int(j1["expires_in"]) <= 3, f"expires_in {j1['expires_in']} exceeds Entra's 3"
    assert abs(int(j1["expires_on"]) - (t0 + 3)) <= 2, f"expires_on {j1['expires_on']} vs now+3"
    time.sleep(4)
    j2 = assert_token_ok(get_token(d.port))
    assert j2["access_token"] != j1["access_token"], "an expired token was served from the cache"
    assert int(j2["expires_on"]) >= time.time() - 0.5, "served token is already expired"
    assert ctx.fake.calls(d.tenant) >= 2


def test_token_file_trailing_newline_trimmed(ctx):
    tok = ctx.token(newline=True)
    d = ctx.daemon(token=tok)
    assert_token_ok(get_token(d.port))
    rec = ctx.fake.records(d.tenant)[-1]
    assert rec["form_ok"], rec["problems"]
    assert rec["assertion_sha256"] == tok.sha256, "assertion was not the trimmed token file content"


def test_token_rotation_picked_up(ctx):
    d = ctx.daemon()
    assert_token_ok(get_token(d.port))
    old = d.token.sha256
    d.token.rotate()   # kubelet's atomic ..data swap; the fake now only accepts the new token
    time.sleep(0.3)
    assert_token_ok(get_token(d.port, "https://vault.azure.net"), resource="https://vault.azure.net")
    oks = ok_records(ctx, d.tenant)
    assert oks[0]["assertion_sha256"] == old
    assert oks[-1]["assertion_sha256"] == d.token.sha256, "the fetch after rotation used the old token"


def test_healthz(ctx):
    d = ctx.daemon()
    r = request(d.port, "/healthz")
    assert r.status == 200 and r.headers.get("content-type") == JSON_CT, r
    assert isinstance(r.json, dict), r


def test_readyz_follows_token_file(ctx):
    d = ctx.daemon()
    tok = d.token

    def ready_is(status):
        r = request(d.port, "/readyz")
        assert r.headers.get("content-type") == JSON_CT, r
        assert isinstance(r.json, dict), r
        return r if r.status == status else None

    wait_for(lambda: ready_is(200), 3, "/readyz 200 with a good token file")
    data = os.path.join(tok.root, "..data")
    os.rename(data, data + ".away")     # the token file now dangles
    r = wait_for(lambda: ready_is(503), 3, "/readyz 503 with a missing token file")
    assert isinstance(r.json.get("error"), str) and isinstance(r.json.get("error_description"), str), r.json
    os.rename(data + ".away", data)
    wait_for(lambda: ready_is(200), 3, "/readyz 200 after the file came back")
    tok.rotate("")                      # empty file
    r = wait_for(lambda: ready_is(503), 3, "/readyz 503 with an empty token file")
    assert r.json.get("error_description"), r.json
    tok.rotate()
    wait_for(lambda: ready_is(200), 3, "/readyz 200 after a good rotation")
