"""App Service 2017-09-01 (MSI_ENDPOINT + MSI_SECRET), which today's Python and JavaScript SDKs call
Azure ML, go-autorest's adal and the older libraries App Service: header `secret`, `clientid`, and
an expires_on that is a UTC date string. The real clients get tokens for the default and a
user-assigned identity; a wrong secret gets 401 at once, never a token."""
import calendar
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "compat"))
import sdk_clients as sdk  # noqa: E402
from harness import CLIENT_ID  # noqa: E402
from sdk_clients import ARM, GRAPH, OTHER_ID, SECRET, VAULT, check_tokens, explain  # noqa: E402

MIC = "ManagedIdentityCredential"
DATE = re.compile(r"^(\d\d)/(\d\d)/(\d{4}) (\d\d):(\d\d):(\d\d) \+00:00$")
AUTH_ERRORS = ("CredentialUnavailableError", "ClientAuthenticationError", "AuthenticationRequiredError")


def epoch_of(date):
    m = DATE.match(date)
    assert m, f"expires_on {date!r} is not MM/DD/YYYY HH:MM:SS +00:00"
    mo, d, y, hh, mm, ss = (int(x) for x in m.groups())
    return calendar.timegm((y, mo, d, hh, mm, ss))


def expiry_of(e):
    """The instant of imdsd's expires_on: a UTC date for App Service 2017 clients, epoch seconds for
    Azure ML's (msal-node, which sends Metadata: true and reads a date as 'expired now')."""
    v = e.response.json["expires_on"]
    if (e.header("Metadata") or "").lower() == "true":
        assert v.isdigit(), f"an Azure ML client got expires_on {v!r}"
        return int(v)
    return epoch_of(v)


def check_wire(cap, selector=None):
    """What the clients sent and what imdsd answered, per request."""
    reqs = cap.token_requests()
    assert reqs, "no request reached imdsd"
    for e in reqs:
        assert e.method == "GET" and e.path == "/msi/token", e.raw_request()
        assert e.q("api-version") == "2017-09-01" and e.header("secret") == SECRET, e.raw_request()
        assert e.header("X-IDENTITY-HEADER") is None
        if selector:
            assert e.q("clientid") == selector, e.raw_request()
        j = e.response.json
        assert e.status == 200 and sorted(j) == ["access_token", "client_id", "expires_on", "resource",
                                                  "token_type"], e.response
        left = expiry_of(e) - time.time()
        assert 3500 < left < 3601, f"expires_on {j['expires_on']} is {left:.0f} s away"
    return reqs


def run(ctx, lang, *a, **kw):
    return (sdk.run_py if lang == "py" else sdk.run_js)(ctx, *a, **kw)


def test_msi2017_default_and_user_assigned(ctx):
    d = ctx.daemon(extra=["--allow-client-id", OTHER_ID, "--identity-header-file", sdk.write_secret(ctx)])
    # msal-node sends the default identity as clientid=$DEFAULT_IDENTITY_CLIENT_ID, which Azure ML
    # always sets; Python sends no clientid
    env = sdk.msi2017_env(ctx, d.port, SECRET, DEFAULT_IDENTITY_CLIENT_ID=CLIENT_ID)
    for lang in ("py", "js"):
        cap = sdk.Capture(ctx, d.port)
        res = run(ctx, lang, MIC, [ARM, VAULT], env)
        check_tokens(ctx, d.tenant, res, CLIENT_ID)
        for e, r in zip(check_wire(cap), res):   # the client turned the date into the same instant
            got = r["expires_on"] if lang == "py" else r["expiresOnTimestamp"] // 1000
            # msal-node may count the instant from expires_in on its own clock: a second either way
            slack = 0 if lang == "py" else 1
            assert abs(got - expiry_of(e)) <= slack, (lang, got, e.response.json["expires_on"])
            assert (lang == "js") == (e.header("Metadata") is not None), e.raw_request()
        cap = sdk.Capture(ctx, d.port)
        opts = {"client_id": OTHER_ID} if lang == "py" else {"clientId": OTHER_ID}
        res = run(ctx, lang, MIC, [GRAPH], env, opts)
        check_tokens(ctx, d.tenant, res, OTHER_ID)
        check_wire(cap, OTHER_ID)


def test_msi2017_wrong_or_unknown(ctx):
    d = ctx.daemon(extra=["--identity-header-file", sdk.write_secret(ctx)])
    for lang in ("py", "js"):
        cap = sdk.Capture(ctx, d.port)
        env = sdk.msi2017_env(ctx, d.port, "not-the-secret", DEFAULT_IDENTITY_CLIENT_ID=CLIENT_ID)
        res = run(ctx, lang, MIC, [ARM], env, timeout=sdk.fail_fast_timeout())
        assert not res[0]["ok"] and res[0]["token"] is None, f"{lang}: a token with a wrong secret"
        assert res[0]["elapsed_ms" if lang == "py" else "elapsedMs"] < sdk.fail_fast_limit() * 1000, explain(res)
        assert [e.status for e in cap.token_requests()] == [401], cap.token_requests()
        # an identity this imdsd does not serve: 400 Identity not found, no retries
        cap = sdk.Capture(ctx, d.port)
        env = sdk.msi2017_env(ctx, d.port, SECRET, DEFAULT_IDENTITY_CLIENT_ID=CLIENT_ID)
        opts = {"client_id": OTHER_ID} if lang == "py" else {"clientId": OTHER_ID}
        res = run(ctx, lang, MIC, [ARM], env, opts, timeout=sdk.fail_fast_timeout())
        assert not res[0]["ok"], f"{lang}: a token for an identity not served"
        assert [e.status for e in cap.token_requests()] == [400], cap.token_requests()
    assert ctx.fake.calls(d.tenant) == 0
