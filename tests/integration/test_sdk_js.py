"""The real, unmodified @azure/identity 4 (JS4: ManagedIdentityCredential, DefaultAzureCredential over
msal-node) against the real imdsd and the stand-in Entra.

The client runs as a Node.js process with only an application container's environment
(tests/compat/js_client.mjs, pinned by tests/compat/package-lock.json); a packet capture of imdsd's
port records exactly what it sent (tests/compat/capture.py). See imds-protocol.md sections 1.4-2.2.
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "compat"))
import sdk_clients as sdk  # noqa: E402
from harness import CLIENT_ID  # noqa: E402
from sdk_clients import (ALIASES, API_SCOPE, ARM, GRAPH, OBJECT_ID, OTHER_ID, RESOURCE_ID,  # noqa: E402
                         RESOURCE_ID_OTHER_CASE, SECRET, SIX_SCOPES, STORAGE, UNKNOWN_ID, VAULT, check_tokens,
                         explain, resource_of)

MIC, DAC = "ManagedIdentityCredential", "DefaultAzureCredential"
# msal-node passes AZURE_POD_IDENTITY_AUTHORITY_HOST + path through UrlString: lower-cased, "/" appended.
JS_IMDS_PATH = "/metadata/identity/oauth2/token/"


def assert_imds_request(e, selector=None):
    """A token request as JS4 sends it: Metadata, api-version, resource, at most one identity selector."""
    assert e.method == "GET", e.raw_request()
    assert (e.header("Metadata") or "").lower() == "true", f"no Metadata: true in {e.raw_request()}"
    assert e.q("api-version") == "2018-02-01", e.raw_request()
    names = [k for k, _ in e.query if k in ("client_id", "object_id", "msi_res_id", "mi_res_id", "principal_id")]
    want = [selector[0]] if selector else []
    assert names == want, f"identity parameters {names}, want {want}: {e.request_line}"
    if selector:
        assert e.q(selector[0]) == selector[1], f"{selector[0]}={e.q(selector[0])!r}, want {selector[1]!r}"


def test_sdk_js_mic_system_identity_six_resources(ctx):
    """MIC, default identity, six kinds of resource; a repeated scope and a second process are cached."""
    d = ctx.daemon()
    cap = sdk.Capture(ctx, d.port)
    env = sdk.imds_env(ctx, d.port)
    res = sdk.run_js(ctx, MIC, SIX_SCOPES + [ARM], env)
    recs = check_tokens(ctx, d.tenant, res, CLIENT_ID, cap, expiry="js")
    assert res[-1]["token"] == res[0]["token"], "second getToken for the same scope got another token"
    assert ctx.fake.calls(d.tenant) == 6, f"fake saw {ctx.fake.calls(d.tenant)} calls for 6 scopes"
    reqs = cap.token_requests()
    assert len(reqs) == 6, f"the SDK sent {len(reqs)} requests for 6 scopes + 1 repeat (own cache): {reqs}"
    for e, scope in zip(reqs, SIX_SCOPES):
        assert_imds_request(e)
        assert e.q("resource") == resource_of(scope), f"resource {e.q('resource')!r} for {scope}"
        assert e.path == JS_IMDS_PATH, f"path {e.path!r}"
        assert e.status == 200, e
    assert recs[ARM]["scope"] == "https://management.azure.com/.default"
    # A new process (new SDK cache) is served from imdsd's cache.
    cap2 = sdk.Capture(ctx, d.port)
    again = sdk.run_js(ctx, MIC, [ARM, GRAPH], env)
    check_tokens(ctx, d.tenant, again, CLIENT_ID, cap2, expiry="js")
    assert [r["token"] for r in again] == [recs[ARM]["access_token"], recs[GRAPH]["access_token"]], \
        "a second process did not get imdsd's cached tokens"
    assert ctx.fake.calls(d.tenant) == 6, "a second process was not served from imdsd's cache"
    assert [e.status for e in cap2.token_requests()] == [200, 200], cap2.token_requests()


def test_sdk_js_dac_default_identity_and_azure_client_id(ctx):
    """DAC with AZURE_POD_IDENTITY_AUTHORITY_HOST: no probe; AZURE_CLIENT_ID becomes client_id."""
    d = ctx.daemon(extra=["--allow-client-id", OTHER_ID])
    cap = sdk.Capture(ctx, d.port)
    res = sdk.run_js(ctx, DAC, [ARM, VAULT, ARM], sdk.imds_env(ctx, d.port))
    check_tokens(ctx, d.tenant, res, CLIENT_ID, cap, expiry="js")
    reqs = cap.token_requests()
    assert len(reqs) == 2, f"want 2 token requests (no probe, SDK cache for the repeat), got {reqs}"
    for e in reqs:
        assert_imds_request(e)
    cap2 = sdk.Capture(ctx, d.port)
    res = sdk.run_js(ctx, DAC, [ARM, VAULT], sdk.imds_env(ctx, d.port, AZURE_CLIENT_ID=OTHER_ID))
    check_tokens(ctx, d.tenant, res, OTHER_ID, cap2, expiry="js")
    for e in cap2.token_requests():
        assert_imds_request(e, ("client_id", OTHER_ID))
    assert ctx.fake.calls(d.tenant) == 4, f"fake calls {ctx.fake.calls(d.tenant)}, want 2 + 2"


def test_sdk_js_authority_host_with_trailing_slash(ctx):
    """AZURE_POD_IDENTITY_AUTHORITY_HOST=http://HOST:PORT/ (trailing slash): msal-node then asks for
    //metadata/identity/oauth2/token/ (imds-protocol.md T7), which imdsd must route like the plain path."""
    d = ctx.daemon()
    cap = sdk.Capture(ctx, d.port)
    env = sdk.client_env(ctx, AZURE_POD_IDENTITY_AUTHORITY_HOST=f"http://127.0.0.1:{d.port}/")
    res = sdk.run_js(ctx, DAC, [STORAGE], env)
    check_tokens(ctx, d.tenant, res, CLIENT_ID, cap, expiry="js")
    reqs = cap.token_requests()
    assert len(reqs) == 1 and reqs[0].path == "/" + JS_IMDS_PATH, f"want one //... request, got {reqs}"
    assert_imds_request(reqs[0])


def test_sdk_js_mic_user_assigned_client_id(ctx):
    """MIC(clientId) of an --allow-client-id identity works; an unknown one is refused without Entra."""
    d = ctx.daemon(extra=["--allow-client-id", OTHER_ID])
    cap = sdk.Capture(ctx, d.port)
    res = sdk.run_js(ctx, MIC, [VAULT, API_SCOPE, VAULT], sdk.imds_env(ctx, d.port), {"clientId": OTHER_ID})
    check_tokens(ctx, d.tenant, res, OTHER_ID, cap, expiry="js")
    for e in cap.token_requests():
        assert_imds_request(e, ("client_id", OTHER_ID))
    calls = ctx.fake.calls(d.tenant)
    assert calls == 2, f"fake calls {calls}, want 2"
    cap2 = sdk.Capture(ctx, d.port)
    res = sdk.run_js(ctx, MIC, [VAULT], sdk.imds_env(ctx, d.port), {"clientId": UNKNOWN_ID})
    assert not res[0]["ok"] and res[0]["token"] is None, f"unknown client id got a token: {explain(res)}"
    assert res[0]["error"]["name"] == "CredentialUnavailableError", explain(res)
    assert ctx.fake.calls(d.tenant) == calls, "Entra was called for an unknown client id"
    reqs = cap2.token_requests()
    assert [e.status for e in reqs] == [400], f"want one 400, got {reqs}"
    assert reqs[0].response.json.get("error_description") == "Identity not found", reqs[0].response


def test_sdk_js_object_id_alias(ctx):
    """MIC(objectId) -> object_id=OBJ; --identity-alias maps it to OTHER_ID, whose token Entra issues."""
    d = ctx.daemon(extra=ALIASES)
    cap = sdk.Capture(ctx, d.port)
    res = sdk.run_js(ctx, MIC, [ARM, VAULT, ARM], sdk.imds_env(ctx, d.port), {"objectId": OBJECT_ID})
    check_tokens(ctx, d.tenant, res, OTHER_ID, cap, expiry="js")
    reqs = cap.token_requests()
    assert len(reqs) == 2, reqs
    for e in reqs:
        assert_imds_request(e, ("object_id", OBJECT_ID))
    assert ctx.fake.calls(d.tenant) == 2


def test_sdk_js_resource_id_alias(ctx):
    """MIC(resourceId) and DAC(managedIdentityResourceId) -> msi_res_id; the alias matches ignoring case."""
    d = ctx.daemon(extra=ALIASES)
    cap = sdk.Capture(ctx, d.port)
    res = sdk.run_js(ctx, MIC, [VAULT, GRAPH], sdk.imds_env(ctx, d.port), {"resourceId": RESOURCE_ID_OTHER_CASE})
    recs = check_tokens(ctx, d.tenant, res, OTHER_ID, cap, expiry="js")
    for e in cap.token_requests():
        assert_imds_request(e, ("msi_res_id", RESOURCE_ID_OTHER_CASE))
    cap2 = sdk.Capture(ctx, d.port)
    res = sdk.run_js(ctx, DAC, [VAULT], sdk.imds_env(ctx, d.port), {"managedIdentityResourceId": RESOURCE_ID})
    check_tokens(ctx, d.tenant, res, OTHER_ID, cap2, expiry="js")
    for e in cap2.token_requests():
        assert_imds_request(e, ("msi_res_id", RESOURCE_ID))
    assert res[0]["token"] == recs[VAULT]["access_token"], "same identity + resource was not served from the cache"
    assert ctx.fake.calls(d.tenant) == 2


def test_sdk_js_object_and_resource_id_without_alias(ctx):
    """Without an alias, object and resource ids are unknown identities: an SDK error, Entra not called."""
    d = ctx.daemon(extra=["--allow-client-id", OTHER_ID])
    for opts in ({"objectId": OBJECT_ID}, {"resourceId": RESOURCE_ID}):
        cap = sdk.Capture(ctx, d.port)
        res = sdk.run_js(ctx, MIC, [ARM], sdk.imds_env(ctx, d.port), opts, timeout=sdk.fail_fast_timeout())
        r = res[0]
        assert not r["ok"] and r["token"] is None, f"{opts}: got a token"
        assert r["error"]["name"] == "CredentialUnavailableError", f"{opts}: {explain(res)}"
        assert r["elapsedMs"] < sdk.fail_fast_limit() * 1000, f"{opts}: took {r['elapsedMs']} ms"
        reqs = cap.token_requests()
        assert [e.status for e in reqs] == [400], f"{opts}: want exactly one 400 (no retry), got {reqs}"
        assert reqs[0].response.json == {"error": "invalid_request", "error_description": "Identity not found"}, \
            reqs[0].response
    assert ctx.fake.calls(d.tenant) == 0, "Entra was called for an unknown identity"


def assert_app_service_request(e, selector=None):
    """A token request as JS4's App Service source sends it."""
    assert e.method == "GET", e.raw_request()
    assert e.path == "/MSI/token", f"path {e.path!r}"
    assert e.header("X-IDENTITY-HEADER") == SECRET, f"no X-IDENTITY-HEADER in {e.raw_request()}"
    assert e.q("api-version") == "2019-08-01", e.raw_request()
    names = [k for k, _ in e.query if k in ("client_id", "object_id", "msi_res_id", "mi_res_id", "principal_id")]
    want = [selector[0]] if selector else []
    assert names == want, f"identity parameters {names}, want {want}: {e.request_line}"
    if selector:
        assert e.q(selector[0]) == selector[1], e.request_line


def test_sdk_js_app_service_protocol(ctx):
    """IDENTITY_ENDPOINT + IDENTITY_HEADER: MIC, DAC, clientId and objectId over /msi/token."""
    d = ctx.daemon(extra=ALIASES + ["--identity-header-file", sdk.write_secret(ctx)])
    env = sdk.app_service_env(ctx, d.port, SECRET)
    cap = sdk.Capture(ctx, d.port)
    res = sdk.run_js(ctx, MIC, [ARM, VAULT, ARM], env)
    recs = check_tokens(ctx, d.tenant, res, CLIENT_ID, cap, expiry="js")
    reqs = cap.token_requests()
    assert len(reqs) == 2, reqs
    for e, scope in zip(reqs, [ARM, VAULT]):
        assert_app_service_request(e)
        assert e.q("resource") == resource_of(scope)
        sdk.assert_app_service_body(e)
    cap2 = sdk.Capture(ctx, d.port)
    dac = sdk.run_js(ctx, DAC, [ARM], env)
    check_tokens(ctx, d.tenant, dac, CLIENT_ID, cap2, expiry="js")
    assert dac[0]["token"] == recs[ARM]["access_token"], "DAC was not served from imdsd's cache"
    assert [e.status for e in cap2.token_requests()] == [200], cap2.token_requests()
    for opts, sel in (({"clientId": OTHER_ID}, ("client_id", OTHER_ID)),
                      ({"objectId": OBJECT_ID}, ("object_id", OBJECT_ID)),
                      ({"resourceId": RESOURCE_ID}, ("mi_res_id", RESOURCE_ID))):
        c = sdk.Capture(ctx, d.port)
        r = sdk.run_js(ctx, MIC, [GRAPH], env, opts)
        check_tokens(ctx, d.tenant, r, OTHER_ID, c, expiry="js")
        for e in c.token_requests():
            assert_app_service_request(e, sel)
            sdk.assert_app_service_body(e)
    assert ctx.fake.calls(d.tenant) == 3, f"fake calls {ctx.fake.calls(d.tenant)}: want ARM, vault, graph(OTHER)"


def test_sdk_js_app_service_wrong_secret(ctx):
    """A wrong IDENTITY_HEADER: 401, an SDK error at once (no retries), no token, Entra not called."""
    d = ctx.daemon(extra=["--identity-header-file", sdk.write_secret(ctx)])
    for kind in (MIC, DAC):
        cap = sdk.Capture(ctx, d.port)
        res = sdk.run_js(ctx, kind, [ARM], sdk.app_service_env(ctx, d.port, "not-the-secret"),
                         timeout=sdk.fail_fast_timeout())
        r = res[0]
        assert not r["ok"] and r["token"] is None, f"{kind}: got a token with a wrong secret"
        assert r["error"]["name"] in ("CredentialUnavailableError", "AggregateAuthenticationError"), explain(res)
        assert r["elapsedMs"] < sdk.fail_fast_limit() * 1000, f"{kind}: took {r['elapsedMs']} ms (retrying?)"
        reqs = cap.token_requests()
        assert [e.status for e in reqs] == [401], f"{kind}: want exactly one 401, got {reqs}"
        j = reqs[0].response.json
        assert isinstance(j, dict) and j.get("error") == "unauthorized_client" and "access_token" not in j, j
        assert "www-authenticate" not in reqs[0].response.headers, reqs[0].response.headers
    assert ctx.fake.calls(d.tenant) == 0, "Entra was called for a request with a wrong secret"


def test_sdk_js_entra_permanent_error(ctx):
    """Entra's AADSTS700016 reaches the application as an SDK error quickly, with the AADSTS text."""
    d = ctx.daemon(ctx.tenant("aadsts-700016"))
    for kind in (MIC, DAC):
        cap = sdk.Capture(ctx, d.port)
        res = sdk.run_js(ctx, kind, [VAULT], sdk.imds_env(ctx, d.port), timeout=sdk.fail_fast_timeout())
        r = res[0]
        assert not r["ok"] and r["token"] is None, f"{kind}: got a token"
        assert r["error"]["name"] in ("CredentialUnavailableError", "AggregateAuthenticationError"), explain(res)
        assert "AADSTS700016" in r["error"]["message"], f"{kind}: Entra's error is lost: {explain(res)}"
        assert r["elapsedMs"] < sdk.fail_fast_limit() * 1000, f"{kind}: took {r['elapsedMs']} ms (retrying?)"
        assert [e.status for e in cap.token_requests()] == [400], f"{kind}: {cap.token_requests()}"
    assert 1 <= ctx.fake.calls(d.tenant) <= 2, f"fake calls {ctx.fake.calls(d.tenant)}"


def test_sdk_js_long_lived_token_refresh_after(ctx):
    """A 24 h token: msal-node derives refreshAfterTimestamp (half-life) itself from expires_on."""
    d = ctx.daemon(ctx.tenant("ok-exp86399"))
    cap = sdk.Capture(ctx, d.port)
    t0 = time.time()
    res = sdk.run_js(ctx, MIC, [ARM], sdk.imds_env(ctx, d.port))
    check_tokens(ctx, d.tenant, res, CLIENT_ID, cap, expiry="js")
    ra = res[0]["refreshAfterTimestamp"]
    assert ra is not None and abs(ra / 1000 - (t0 + 86399 / 2)) < 30, f"refreshAfterTimestamp {ra}"


def test_sdk_js_imds_probe_in_netns(ctx):
    """No AZURE_POD_IDENTITY_AUTHORITY_HOST: imdsd on 169.254.169.254:80. DAC probes (no query, no
    Metadata, 1 s timeout) before EVERY getToken, even one its own cache then answers; each probe gets
    a 400 at once, and the tokens follow. MIC alone goes straight to the token request from 4.10 on;
    4.9 (the Node 18 pin) probes with MIC alone too (managedIdentityCredential/index.js, isImdsMsi)."""
    ns, d, fake = sdk.netns_setup(ctx)
    cap = sdk.Capture(ctx, 80, netns=ns)
    env = sdk.client_env(ctx)
    res = sdk.run_js(ctx, DAC, [ARM, VAULT, ARM], env, netns=ns)
    check_tokens(ctx, d.tenant, res, CLIENT_ID, cap, fake=fake, expiry="js")
    reqs = cap.token_requests()
    kinds = ["probe" if e.header("Metadata") is None else "token" for e in reqs]
    assert kinds == ["probe", "token", "probe", "token", "probe"], f"probe/token sequence {kinds}: {reqs}"
    for probe in reqs[0::2]:
        assert probe.method == "GET" and probe.target == "/metadata/identity/oauth2/token", probe.raw_request()
        assert probe.status == 400 and probe.response.json == {
            "error": "invalid_request", "error_description": "Required metadata header not specified"}, probe.response
        assert probe.latency < 0.3 * ctx.scale, f"probe answered in {probe.latency:.3f} s"
    for e in reqs[1::2]:
        assert_imds_request(e)
        assert e.path == "/metadata/identity/oauth2/token", f"path {e.path!r}"
        assert e.status == 200 and e.header("Host") == "169.254.169.254", e.raw_request()
    assert d.log().count("status=400") >= 3, "imdsd's debug log does not show the probes' 400s"
    assert len(fake.records(d.tenant)) == 2, "Entra was called for a probe"
    cap2 = sdk.Capture(ctx, 80, netns=ns)
    res = sdk.run_js(ctx, MIC, [GRAPH], env, netns=ns)
    check_tokens(ctx, d.tenant, res, CLIENT_ID, cap2, fake=fake, expiry="js")
    reqs = cap2.token_requests()
    if sdk.js_identity_version() < (4, 10):
        assert [e.header("Metadata") is None for e in reqs] == [True, False], f"4.9: probe, then token: {reqs}"
        assert reqs[0].status == 400 and reqs[0].target == "/metadata/identity/oauth2/token", reqs[0]
        reqs = reqs[1:]
    assert len(reqs) == 1 and reqs[0].status == 200, f"MIC alone does not probe: {reqs}"
    assert_imds_request(reqs[0])
