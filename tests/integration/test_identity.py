"""Identity selection (client_id, object/principal id and ARM resource id aliases) and the App
Service protocol (/msi/token with X-IDENTITY-HEADER), at the HTTP level."""
import os
import urllib.parse

from harness import (CLIENT_ID, RESOURCE, assert_json_error, assert_token_ok, get_token, request,
                     token_url)

EXTRA = "5e6f7a8b-1111-4111-8111-11111111111b"
OBJECT_ID = "0b1ec700-0000-4000-8000-000000000001"
RES_ID = ("/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/"
          "Microsoft.ManagedIdentity/userAssignedIdentities/app-identity")
SECRET = "3f1d6c0e-appservice-secret"
APPSVC_FIELDS = ["access_token", "client_id", "expires_on", "not_before", "resource", "token_type"]


def alias_daemon(ctx, **kw):
    return ctx.daemon(extra=["--allow-client-id", EXTRA, "--identity-alias", f"{OBJECT_ID}={EXTRA}",
                             "--identity-alias", f"{RES_ID}={EXTRA}"] + list(kw.pop("extra", [])), **kw)


def q(**params):
    return "&" + urllib.parse.urlencode(params)


def test_alias_selectors_map_to_the_client_id(ctx):
    d = alias_daemon(ctx)
    for extra in (q(object_id=OBJECT_ID), q(principal_id=OBJECT_ID.upper()), q(msi_res_id=RES_ID),
                  q(mi_res_id=RES_ID.lower()), q(**{"msi-res-id": RES_ID})):
        r = request(d.port, token_url(extra=extra), {"Metadata": "true"})
        assert_token_ok(r, client_id=EXTRA)
    seen = {rec["client_id"] for rec in ctx.fake.records(d.tenant)}
    assert seen == {EXTRA}, f"Entra saw client ids {seen}, want only {EXTRA}"
    assert ctx.fake.calls(d.tenant) == 1, "the aliases did not share the (client id, resource) cache entry"


def test_unknown_selectors_never_get_a_token(ctx):
    d = alias_daemon(ctx)
    for extra in (q(object_id="0b1ec700-0000-4000-8000-000000000002"), q(msi_res_id=RES_ID + "x"),
                  q(client_id=OBJECT_ID), q(object_id=EXTRA),
                  q(client_id=EXTRA, object_id=OBJECT_ID)):
        r = request(d.port, token_url(extra=extra), {"Metadata": "true"})
        assert_json_error(r, 400, "invalid_request")
        assert "retry-after" not in r.headers
    r = request(d.port, token_url(extra=q(object_id="0b1ec700-0000-4000-8000-000000000002")),
                {"Metadata": "true"})
    assert r.json["error_description"] == "Identity not found", r.json
    assert ctx.fake.calls(d.tenant) == 0, "Entra was called for an identity that is not served"


def test_alias_to_an_unserved_client_is_a_config_error(ctx):
    tok = ctx.token()
    rc, out, err = ctx.run(["--client-id", CLIENT_ID, "--tenant-id", "t", "--token-file", tok.path,
                            "--identity-alias", f"{OBJECT_ID}={EXTRA}"])
    assert rc == 2, (rc, err)
    assert len(err.strip().splitlines()) == 1 and "--identity-alias" in err and EXTRA in err, err
    rc, out, err = ctx.run(["--client-id", CLIENT_ID, "--tenant-id", "t", "--token-file", tok.path,
                            "--identity-alias", f"not-an-id={CLIENT_ID}"])
    assert rc == 2 and "--identity-alias" in err and "not-an-id" in err, (rc, err)


def secret_file(ctx, content=SECRET + "\n"):
    ctx.n += 1
    path = os.path.join(ctx.tmp, f"identity-header-{ctx.n}")
    with open(path, "w") as f:
        f.write(content)
    return path


def appsvc_url(resource=RESOURCE, api="2019-08-01", extra="", path="/msi/token"):
    return f"{path}?api-version={api}&resource={urllib.parse.quote(resource, safe='')}{extra}"


def test_app_service_token(ctx):
    d = alias_daemon(ctx, extra=["--identity-header-file", secret_file(ctx)])
    r = request(d.port, appsvc_url(), {"X-IDENTITY-HEADER": SECRET})
    assert r.status == 200, r
    assert r.headers.get("content-type") == "application/json; charset=utf-8"
    assert sorted(r.json) == APPSVC_FIELDS, sorted(r.json)
    assert all(isinstance(v, str) for v in r.json.values()), r.json
    assert r.json["resource"] == RESOURCE and r.json["client_id"] == CLIENT_ID
    # the same cache serves both protocols
    imds = assert_token_ok(get_token(d.port))
    assert imds["access_token"] == r.json["access_token"] and imds["expires_on"] == r.json["expires_on"]
    # user-assigned selection as the SDKs send it on App Service, and tolerant routing
    r = request(d.port, appsvc_url(extra=q(principal_id=OBJECT_ID), path="/MSI/token/"),
                {"X-IDENTITY-HEADER": SECRET})
    assert r.status == 200 and r.json["client_id"] == EXTRA, r
    assert ctx.fake.calls(d.tenant) == 2


def test_app_service_rejects_missing_or_wrong_secret(ctx):
    d = ctx.daemon(extra=["--identity-header-file", secret_file(ctx)])
    for headers in ({}, {"X-IDENTITY-HEADER": SECRET + "x"}, {"X-IDENTITY-HEADER": SECRET[:-1]},
                    {"X-IDENTITY-HEADER": ""}, {"Metadata": "true"},
                    {"X-IDENTITY-HEADER": SECRET.upper()}):
        r = request(d.port, appsvc_url(), headers)
        assert_json_error(r, 401, "unauthorized_client")
        assert "www-authenticate" not in r.headers, "401 + WWW-Authenticate looks like Azure Arc"
        assert "retry-after" not in r.headers
        assert r.json.get("statusCode") == 401 and isinstance(r.json.get("message"), str), r.json
    assert ctx.fake.calls(d.tenant) == 0
    assert SECRET not in d.log(), "the shared secret reached the log"
    # the old App Service api-version is not this protocol
    r = request(d.port, appsvc_url(api="2017-09-01"), {"X-IDENTITY-HEADER": SECRET})
    assert_json_error(r, 400, "invalid_request")


def test_app_service_off_without_secret_file(ctx):
    d = ctx.daemon()
    r = request(d.port, appsvc_url(), {"X-IDENTITY-HEADER": SECRET})
    assert_json_error(r, 404, "not_found")
    assert ctx.fake.calls(d.tenant) == 0


def test_identity_header_file_errors_exit_2(ctx):
    tok = ctx.token()
    base = ["--client-id", CLIENT_ID, "--tenant-id", "t", "--token-file", tok.path]
    for path, why in ((os.path.join(ctx.tmp, "missing"), "cannot read"),
                      (secret_file(ctx, "  \n"), "is empty"),
                      (secret_file(ctx, "x" * 300), "more than 255")):
        rc, out, err = ctx.run(base + ["--identity-header-file", path])
        assert rc == 2, (rc, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "--identity-header-file" in err and path in err and why in err, err
