"""The real, unmodified azure-identity (PY13: Debian's python3-azure, azure-identity 1.13.0b2 + msal 1.21)
against the real imdsd and the stand-in Entra: ManagedIdentityCredential and DefaultAzureCredential.

The client runs as /usr/bin/python3 with only an application container's environment
(tests/compat/py_client.py); a packet capture of imdsd's port records exactly what it sent
(tests/compat/capture.py). See imds-protocol.md sections 1.4-2.2.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "compat"))
import sdk_clients as sdk  # noqa: E402
from harness import CLIENT_ID  # noqa: E402
from sdk_clients import (ALIASES, API_SCOPE, ARM, GRAPH, OBJECT_ID, OTHER_ID, RESOURCE_ID,  # noqa: E402
                         RESOURCE_ID_OTHER_CASE, SECRET, SIX_SCOPES, STORAGE, UNKNOWN_ID, VAULT, check_tokens,
                         explain, resource_of)

MIC, DAC = "ManagedIdentityCredential", "DefaultAzureCredential"
PY_IMDS_PATH = "/metadata/identity/oauth2/token"
AUTH_ERRORS = ("CredentialUnavailableError", "ClientAuthenticationError")   # the first subclasses the second


def assert_imds_request(e, selector=None):
    """A token request as PY13's ImdsCredential sends it."""
    assert e.method == "GET", e.raw_request()
    assert e.path == PY_IMDS_PATH, f"path {e.path!r}"
    assert (e.header("Metadata") or "").lower() == "true", f"no Metadata: true in {e.raw_request()}"
    assert e.q("api-version") == "2018-02-01", e.raw_request()
    names = [k for k, _ in e.query if k in ("client_id", "object_id", "msi_res_id", "mi_res_id", "principal_id")]
    want = [selector[0]] if selector else []
    assert names == want, f"identity parameters {names}, want {want}: {e.request_line}"
    if selector:
        assert e.q(selector[0]) == selector[1], f"{selector[0]}={e.q(selector[0])!r}, want {selector[1]!r}"


def error_text(r):
    e = r["error"] or {}
    return f"{e.get('message')} <- {e.get('cause')}"


def test_sdk_py_mic_system_identity_six_resources(ctx):
    """MIC, default identity, six kinds of resource; a repeated scope and a second process are cached."""
    d = ctx.daemon()
    cap = sdk.Capture(ctx, d.port)
    env = sdk.imds_env(ctx, d.port)
    res = sdk.run_py(ctx, MIC, SIX_SCOPES + [ARM], env)
    recs = check_tokens(ctx, d.tenant, res, CLIENT_ID, cap, expiry="py")
    assert res[-1]["token"] == res[0]["token"], "second get_token for the same scope got another token"
    assert ctx.fake.calls(d.tenant) == 6, f"fake saw {ctx.fake.calls(d.tenant)} calls for 6 scopes"
    reqs = cap.token_requests()
    assert len(reqs) == 6, f"the SDK sent {len(reqs)} requests for 6 scopes + 1 repeat (own cache): {reqs}"
    for e, scope in zip(reqs, SIX_SCOPES):
        assert_imds_request(e)
        assert e.q("resource") == resource_of(scope), f"resource {e.q('resource')!r} for {scope}"
        assert e.status == 200, e
    cap2 = sdk.Capture(ctx, d.port)
    again = sdk.run_py(ctx, MIC, [ARM, GRAPH], env)
    check_tokens(ctx, d.tenant, again, CLIENT_ID, cap2, expiry="py")
    assert [r["token"] for r in again] == [recs[ARM]["access_token"], recs[GRAPH]["access_token"]], \
        "a second process did not get imdsd's cached tokens"
    assert ctx.fake.calls(d.tenant) == 6, "a second process was not served from imdsd's cache"
    assert [e.status for e in cap2.token_requests()] == [200, 200], cap2.token_requests()


def test_sdk_py_dac_default_identity_and_azure_client_id(ctx):
    """DAC with AZURE_POD_IDENTITY_AUTHORITY_HOST: no probe; AZURE_CLIENT_ID becomes client_id."""
    d = ctx.daemon(extra=["--allow-client-id", OTHER_ID])
    cap = sdk.Capture(ctx, d.port)
    res = sdk.run_py(ctx, DAC, [ARM, VAULT, ARM], sdk.imds_env(ctx, d.port))
    check_tokens(ctx, d.tenant, res, CLIENT_ID, cap, expiry="py")
    reqs = cap.token_requests()
    assert len(reqs) == 2, f"want 2 token requests (no probe, SDK cache for the repeat), got {reqs}"
    for e in reqs:
        assert_imds_request(e)
    cap2 = sdk.Capture(ctx, d.port)
    res = sdk.run_py(ctx, DAC, [ARM, VAULT], sdk.imds_env(ctx, d.port, AZURE_CLIENT_ID=OTHER_ID))
    check_tokens(ctx, d.tenant, res, OTHER_ID, cap2, expiry="py")
    for e in cap2.token_requests():
        assert_imds_request(e, ("client_id", OTHER_ID))
    assert ctx.fake.calls(d.tenant) == 4, f"fake calls {ctx.fake.calls(d.tenant)}, want 2 + 2"


def test_sdk_py_authority_host_with_trailing_slash(ctx):
    """AZURE_POD_IDENTITY_AUTHORITY_HOST=http://HOST:PORT/ (trailing slash): PY13 strips it."""
    d = ctx.daemon()
    cap = sdk.Capture(ctx, d.port)
    env = sdk.client_env(ctx, AZURE_POD_IDENTITY_AUTHORITY_HOST=f"http://127.0.0.1:{d.port}/")
    res = sdk.run_py(ctx, DAC, [STORAGE], env)
    check_tokens(ctx, d.tenant, res, CLIENT_ID, cap, expiry="py")
    reqs = cap.token_requests()
    assert len(reqs) == 1, reqs
    assert_imds_request(reqs[0])


def test_sdk_py_mic_user_assigned_client_id(ctx):
    """MIC(client_id) of an --allow-client-id identity works; an unknown one is refused without Entra."""
    d = ctx.daemon(extra=["--allow-client-id", OTHER_ID])
    cap = sdk.Capture(ctx, d.port)
    res = sdk.run_py(ctx, MIC, [VAULT, API_SCOPE, VAULT], sdk.imds_env(ctx, d.port), {"client_id": OTHER_ID})
    check_tokens(ctx, d.tenant, res, OTHER_ID, cap, expiry="py")
    for e in cap.token_requests():
        assert_imds_request(e, ("client_id", OTHER_ID))
    calls = ctx.fake.calls(d.tenant)
    assert calls == 2, f"fake calls {calls}, want 2"
    cap2 = sdk.Capture(ctx, d.port)
    res = sdk.run_py(ctx, MIC, [VAULT], sdk.imds_env(ctx, d.port), {"client_id": UNKNOWN_ID})
    assert not res[0]["ok"] and res[0]["token"] is None, f"unknown client id got a token: {explain(res)}"
    assert res[0]["error"]["name"] == "CredentialUnavailableError", explain(res)
    assert ctx.fake.calls(d.tenant) == calls, "Entra was called for an unknown client id"
    reqs = cap2.token_requests()
    assert [e.status for e in reqs] == [400], f"want one 400, got {reqs}"
    assert reqs[0].response.json.get("error_description") == "Identity not found", reqs[0].response


def test_sdk_py_object_id_alias(ctx):
    """MIC(identity_config={"object_id": OBJ}); --identity-alias maps it to OTHER_ID."""
    d = ctx.daemon(extra=ALIASES)
    cap = sdk.Capture(ctx, d.port)
    res = sdk.run_py(ctx, MIC, [ARM, VAULT, ARM], sdk.imds_env(ctx, d.port),
                     {"identity_config": {"object_id": OBJECT_ID}})
    check_tokens(ctx, d.tenant, res, OTHER_ID, cap, expiry="py")
    reqs = cap.token_requests()
    assert len(reqs) == 2, reqs
    for e in reqs:
        assert_imds_request(e, ("object_id", OBJECT_ID))
    assert ctx.fake.calls(d.tenant) == 2


def test_sdk_py_resource_id_alias(ctx):
    """MIC(identity_config={"mi_res_id": RID}) and {"msi_res_id": RID}; the alias matches ignoring case."""
    d = ctx.daemon(extra=ALIASES)
    first = None
    for key, rid in (("mi_res_id", RESOURCE_ID_OTHER_CASE), ("msi_res_id", RESOURCE_ID)):
        cap = sdk.Capture(ctx, d.port)
        res = sdk.run_py(ctx, MIC, [VAULT], sdk.imds_env(ctx, d.port), {"identity_config": {key: rid}})
        check_tokens(ctx, d.tenant, res, OTHER_ID, cap, expiry="py")
        for e in cap.token_requests():
            assert_imds_request(e, (key, rid))
        first = first or res[0]["token"]
        assert res[0]["token"] == first, "same identity + resource was not served from imdsd's cache"
    assert ctx.fake.calls(d.tenant) == 1


def test_sdk_py_object_and_resource_id_without_alias(ctx):
    """Without an alias, object and resource ids are unknown identities: an SDK error, Entra not called."""
    d = ctx.daemon(extra=["--allow-client-id", OTHER_ID])
    for cfg in ({"object_id": OBJECT_ID}, {"mi_res_id": RESOURCE_ID}):
        cap = sdk.Capture(ctx, d.port)
        res = sdk.run_py(ctx, MIC, [ARM], sdk.imds_env(ctx, d.port), {"identity_config": cfg},
                         timeout=sdk.fail_fast_timeout())
        r = res[0]
        assert not r["ok"] and r["token"] is None, f"{cfg}: got a token"
        assert r["error"]["name"] == "CredentialUnavailableError", f"{cfg}: {explain(res)}"
        assert r["elapsed_ms"] < sdk.fail_fast_limit() * 1000, f"{cfg}: took {r['elapsed_ms']} ms"
        reqs = cap.token_requests()
        assert [e.status for e in reqs] == [400], f"{cfg}: want exactly one 400 (no retry), got {reqs}"
        assert reqs[0].response.json == {"error": "invalid_request", "error_description": "Identity not found"}, \
            reqs[0].response
    assert ctx.fake.calls(d.tenant) == 0, "Entra was called for an unknown identity"


def assert_app_service_request(e, selector=None):
    """A token request as PY13's AppServiceCredential sends it."""
    assert e.method == "GET", e.raw_request()
    assert e.path == "/MSI/token", f"path {e.path!r}"
    assert e.header("X-IDENTITY-HEADER") == SECRET, f"no X-IDENTITY-HEADER in {e.raw_request()}"
    assert e.q("api-version") == "2019-08-01", e.raw_request()
    names = [k for k, _ in e.query if k in ("client_id", "object_id", "msi_res_id", "mi_res_id", "principal_id")]
    want = [selector[0]] if selector else []
    assert names == want, f"identity parameters {names}, want {want}: {e.request_line}"
    if selector:
        assert e.q(selector[0]) == selector[1], e.request_line


def test_sdk_py_app_service_protocol(ctx):
    """IDENTITY_ENDPOINT + IDENTITY_HEADER: MIC, DAC, client_id, object_id and mi_res_id over /msi/token."""
    d = ctx.daemon(extra=ALIASES + ["--identity-header-file", sdk.write_secret(ctx)])
    env = sdk.app_service_env(ctx, d.port, SECRET)
    cap = sdk.Capture(ctx, d.port)
    res = sdk.run_py(ctx, MIC, [ARM, VAULT, ARM], env)
    recs = check_tokens(ctx, d.tenant, res, CLIENT_ID, cap, expiry="py")
    reqs = cap.token_requests()
    assert len(reqs) == 2, reqs
    for e, scope in zip(reqs, [ARM, VAULT]):
        assert_app_service_request(e)
        assert e.q("resource") == resource_of(scope)
        sdk.assert_app_service_body(e)
    cap2 = sdk.Capture(ctx, d.port)
    dac = sdk.run_py(ctx, DAC, [ARM], env)
    check_tokens(ctx, d.tenant, dac, CLIENT_ID, cap2, expiry="py")
    assert dac[0]["token"] == recs[ARM]["access_token"], "DAC was not served from imdsd's cache"
    assert [e.status for e in cap2.token_requests()] == [200], cap2.token_requests()
    for opts, sel in (({"client_id": OTHER_ID}, ("client_id", OTHER_ID)),
                      ({"identity_config": {"object_id": OBJECT_ID}}, ("object_id", OBJECT_ID)),
                      ({"identity_config": {"mi_res_id": RESOURCE_ID}}, ("mi_res_id", RESOURCE_ID))):
        c = sdk.Capture(ctx, d.port)
        r = sdk.run_py(ctx, MIC, [GRAPH], env, opts)
        check_tokens(ctx, d.tenant, r, OTHER_ID, c, expiry="py")
        for e in c.token_requests():
            assert_app_service_request(e, sel)
            sdk.assert_app_service_body(e)
    assert ctx.fake.calls(d.tenant) == 3, f"fake calls {ctx.fake.calls(d.tenant)}: want ARM, vault, graph(OTHER)"


def test_sdk_py_app_service_wrong_secret(ctx):
    """A wrong IDENTITY_HEADER: 401, an SDK error at once (no retries), no token, Entra not called."""
    d = ctx.daemon(extra=["--identity-header-file", sdk.write_secret(ctx)])
    for kind in (MIC, DAC):
        cap = sdk.Capture(ctx, d.port)
        res = sdk.run_py(ctx, kind, [ARM], sdk.app_service_env(ctx, d.port, "not-the-secret"),
                         timeout=sdk.fail_fast_timeout())
        r = res[0]
        assert not r["ok"] and r["token"] is None, f"{kind}: got a token with a wrong secret"
        assert r["error"]["name"] in AUTH_ERRORS, explain(res)
        assert r["elapsed_ms"] < sdk.fail_fast_limit() * 1000, f"{kind}: took {r['elapsed_ms']} ms (retrying?)"
        reqs = cap.token_requests()
        assert [e.status for e in reqs] == [401], f"{kind}: want exactly one 401, got {reqs}"
        j = reqs[0].response.json
        assert isinstance(j, dict) and j.get("error") == "unauthorized_client" and "access_token" not in j, j
        assert "www-authenticate" not in reqs[0].response.headers, reqs[0].response.headers
    assert ctx.fake.calls(d.tenant) == 0, "Entra was called for a request with a wrong secret"


def test_sdk_py_entra_permanent_error(ctx):
    """Entra's AADSTS700016 reaches the application as an SDK authentication error quickly."""
    d = ctx.daemon(ctx.tenant("aadsts-700016"))
    for kind in (MIC, DAC):
        cap = sdk.Capture(ctx, d.port)
        res = sdk.run_py(ctx, kind, [VAULT], sdk.imds_env(ctx, d.port), timeout=sdk.fail_fast_timeout())
        r = res[0]
        assert not r["ok"] and r["token"] is None, f"{kind}: got a token"
        assert r["error"]["name"] in AUTH_ERRORS, explain(res)
        assert r["elapsed_ms"] < sdk.fail_fast_limit() * 1000, f"{kind}: took {r['elapsed_ms']} ms (retrying?)"
        assert [e.status for e in cap.token_requests()] == [400], f"{kind}: {cap.token_requests()}"
        if kind == MIC:
            # PY13 turns every 400 into "no identity assigned"; Entra's text survives only in the cause
            assert "AADSTS700016" in error_text(r), f"Entra's error is lost: {error_text(r)}"
    assert 1 <= ctx.fake.calls(d.tenant) <= 2, f"fake calls {ctx.fake.calls(d.tenant)}"


def test_sdk_py_imds_probe_in_netns(ctx):
    """No AZURE_POD_IDENTITY_AUTHORITY_HOST: imdsd on 169.254.169.254:80. ImdsCredential (MIC and DAC)
    probes once with the full request minus Metadata (0.3 s connect timeout), gets a 400 at once, then
    its tokens."""
    ns, d, fake = sdk.netns_setup(ctx)
    env = sdk.client_env(ctx)
    for kind, scopes in ((MIC, [ARM, VAULT, ARM]), (DAC, [GRAPH, ARM])):
        cap = sdk.Capture(ctx, 80, netns=ns)
        res = sdk.run_py(ctx, kind, scopes, env, netns=ns)
        check_tokens(ctx, d.tenant, res, CLIENT_ID, cap, fake=fake, expiry="py")
        reqs = cap.token_requests()
        kinds = ["probe" if e.header("Metadata") is None else "token" for e in reqs]
        want = ["probe"] + ["token"] * len(set(scopes))
        assert kinds == want, f"{kind}: probe/token sequence {kinds}, want {want}: {reqs}"
        probe = reqs[0]
        assert probe.path == PY_IMDS_PATH and probe.q("api-version") == "2018-02-01" and \
            probe.q("resource") == resource_of(scopes[0]), f"{kind}: probe {probe.raw_request()}"
        assert probe.status == 400 and probe.response.json == {
            "error": "invalid_request", "error_description": "Required metadata header not specified"}, probe.response
        assert probe.latency < 0.3 * ctx.scale, f"{kind}: probe answered in {probe.latency:.3f} s"
        for e in reqs[1:]:
            assert_imds_request(e)
            assert e.status == 200 and e.header("Host") == "169.254.169.254", e.raw_request()
    assert d.log().count("status=400") >= 2, "imdsd's debug log does not show the probes' 400s"
    assert len(fake.records(d.tenant)) == 3, f"Entra calls {len(fake.records(d.tenant))}: want ARM, vault, graph " \
        "(the second ARM from imdsd's cache)"
