"""The Cloud Shell protocol (MSI_ENDPOINT alone): POST to the token path with Metadata: true and a
form body. The real Python and JavaScript clients get tokens; raw requests check the body's
limits and errors, and that GET is unchanged."""
import os
import sys

from harness import (CLIENT_ID, RESOURCE, TOKEN_PATH, assert_json_error, assert_token_ok, get_token, parse_raw,
                     raw_exchange, request)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "compat"))
import sdk_clients as sdk  # noqa: E402
from sdk_clients import ARM, OTHER_ID, VAULT, check_tokens  # noqa: E402

FORM = {"Metadata": "true", "Content-Type": "application/x-www-form-urlencoded"}


def post(d, body, headers=FORM, path=TOKEN_PATH):
    return request(d.port, path, headers, method="POST", body=body)


def test_cloud_shell_real_clients(ctx):
    d = ctx.daemon()
    env = sdk.cloud_shell_env(ctx, d.port)
    for run in (sdk.run_py, sdk.run_js):
        cap = sdk.Capture(ctx, d.port)
        res = run(ctx, "ManagedIdentityCredential", [ARM, VAULT], env)
        check_tokens(ctx, d.tenant, res, CLIENT_ID)
        for e in cap.token_requests():
            assert e.method == "POST" and e.path == TOKEN_PATH and e.header("Metadata") == "true", e.raw_request()
            assert e.status == 200 and int(e.response.json["expires_in"]) > 3500, e.response
    assert ctx.fake.calls(d.tenant) == 2, "the second client was not served from imdsd's cache"


def test_cloud_shell_form_rules(ctx):
    d = ctx.daemon(extra=["--allow-client-id", OTHER_ID])
    assert_token_ok(post(d, "resource=https%3A%2F%2Fmanagement.azure.com%2F"))
    assert_token_ok(post(d, "resource=https://vault.azure.net&client_id=" + OTHER_ID), "https://vault.azure.net",
                    client_id=OTHER_ID)
    charset = dict(FORM, **{"Content-Type": "Application/X-WWW-Form-Urlencoded; charset=utf-8"})
    assert_token_ok(post(d, "resource=" + RESOURCE, charset))
    assert_json_error(post(d, "resource=x", {"Content-Type": FORM["Content-Type"]}), 400, "invalid_request",
                      "Required metadata header not specified")
    assert_json_error(post(d, "resource=x", {"Metadata": "true", "Content-Type": "application/json"}), 400,
                      "invalid_request")
    assert_json_error(post(d, ""), 400, "invalid_request", "Required query variable 'resource' is missing")
    assert_json_error(post(d, "resource=a&resource=b"), 400, "invalid_request")
    assert_json_error(post(d, "resource=a&client_id=" + "0" * 8 + "-0000-0000-0000-" + "0" * 12), 400,
                      "invalid_request", "Identity not found")
    assert_json_error(post(d, "resource=a&api-version=1999-01-01"), 400, "invalid_request")
    assert_json_error(post(d, "resource=a", dict(FORM, **{"X-Forwarded-For": "1.2.3.4"})), 400, "invalid_request")
    assert_json_error(post(d, "resource=a", dict(FORM, Host="evil.example")), 403, "forbidden")
    # body limits: at most 4 KiB, then 413 and the connection closes
    big = "resource=" + "a" * 5000
    got, closed = raw_exchange(d.port, (f"POST {TOKEN_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: true\r\n"
                                        "Content-Type: application/x-www-form-urlencoded\r\n"
                                        f"Content-Length: {len(big)}\r\n\r\n{big}").encode(), timeout=3)
    assert parse_raw(got).status == 413 and closed, got[:120]
    # GET is unchanged, and still takes no body
    assert_token_ok(get_token(d.port))
    r = request(d.port, TOKEN_PATH + "?api-version=2018-02-01&resource=x", {"Metadata": "true"}, body="x=1")
    assert_json_error(r, 400, "invalid_request", "A token request must not have a body")
    # other methods are still 405
    assert_json_error(request(d.port, TOKEN_PATH, FORM, method="PUT", body="resource=x"), 405, "method_not_allowed")
    # the App Service endpoint does not take POST
    assert request(d.port, "/msi/token", FORM, method="POST", body="resource=x").status in (404, 405)
