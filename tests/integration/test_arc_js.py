"""The Azure Arc challenge with the real JavaScript client, which (like Go's azidentity) accepts a
key file only in /var/opt/azcmagent/tokens: the test uses that directory, one test at a time; it
also checks that msal-node retries a challenge refused with 429."""
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "compat"))
import sdk_clients as sdk  # noqa: E402
from harness import CLIENT_ID  # noqa: E402
from sdk_clients import ARM, GRAPH, check_tokens  # noqa: E402
from test_arc import refused_then_freed  # noqa: E402

ONLY_VARIANTS = ("plain",)   # one daemon at a time in the machine-wide directory
JS_KEY_DIR = "/var/opt/azcmagent/tokens"


def test_arc_javascript_client(ctx):
    created = not os.path.isdir(JS_KEY_DIR)
    os.makedirs(JS_KEY_DIR, exist_ok=True)
    try:
        d = ctx.daemon(extra=["--arc-key-dir", JS_KEY_DIR])
        res = sdk.run_js(ctx, "ManagedIdentityCredential", [ARM], sdk.arc_env(ctx, d.port))
        check_tokens(ctx, d.tenant, res, CLIENT_ID)
        # refused (429, Retry-After: 1) while every key slot is live, msal-node retries and gets its
        # token once slots free up (in this test: one directory, one test at a time)
        res = refused_then_freed(d, lambda: sdk.run_js(ctx, "ManagedIdentityCredential", [GRAPH],
                                                        sdk.arc_env(ctx, d.port)))
        check_tokens(ctx, d.tenant, res, CLIENT_ID)
        assert res[0]["process_seconds"] >= 0.9, res
        d.stop()
    finally:
        if created:
            shutil.rmtree("/var/opt/azcmagent", ignore_errors=True)

