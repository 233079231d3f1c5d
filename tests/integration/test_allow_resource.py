"""--allow-resource: least privilege by audience. Resources it does not name get what real IMDS
answers for a resource it will not issue (400 invalid_resource), before Entra is called, on both
protocols, counted in /metrics and logged; the real Python client gets that error at once."""
import os
import sys

from harness import assert_json_error, assert_token_ok, free_port, get_token, log_events, request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "compat"))
import sdk_clients as sdk  # noqa: E402

SECRET = sdk.SECRET


def test_allow_resource(ctx):
    hp = free_port()
    d = ctx.daemon(extra=["--allow-resource", "https://*.vault.azure.net", "--allow-resource",
                          "https://management.azure.com/", "--health-listen", f"127.0.0.1:{hp}",
                          "--identity-header-file", sdk.write_secret(ctx)])
    for ok in ("https://management.azure.com/", "https://management.azure.com", "https://kv1.vault.azure.net"):
        assert_token_ok(get_token(d.port, resource=ok), resource=ok)
    calls = ctx.fake.calls(d.tenant)
    for no in ("https://graph.microsoft.com/", "https://vault.azure.net", "https://a.b.vault.azure.net",
               "https://kv1.vault.azure.net.evil.example", "https://management.azure.com/x"):
        r = get_token(d.port, resource=no)
        assert_json_error(r, 400, "invalid_resource")
        assert "retry-after" not in r.headers
    r = request(d.port, "/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fgraph.microsoft.com",
                {"X-IDENTITY-HEADER": SECRET})
    assert r.status == 400 and r.json["error"] == "invalid_resource" and r.json["statusCode"] == 400, r
    assert ctx.fake.calls(d.tenant) == calls, "Entra was asked for a resource that is not allowed"
    text = request(hp, "/metrics").body.decode()
    assert "\nimdsd_resources_refused_total 6\n" in text, [l for l in text.splitlines() if "refused" in l]
    refused = log_events(d.log(), "resource_refused")
    assert len(refused) == 1 and refused[0]["resource"] == "https://graph.microsoft.com/", refused
    # the real client: an error at once, no retries
    cap = sdk.Capture(ctx, d.port)
    res = sdk.run_py(ctx, "ManagedIdentityCredential", ["https://graph.microsoft.com/.default"],
                     sdk.imds_env(ctx, d.port), timeout=sdk.fail_fast_timeout())
    assert not res[0]["ok"] and res[0]["token"] is None, res
    assert [e.status for e in cap.token_requests()] == [400], cap.token_requests()
