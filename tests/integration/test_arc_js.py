"""The Azure Arc challenge with the real JavaScript client, which (like Go's azidentity) accepts a
key file only in /var/opt/azcmagent/tokens: the test uses that directory, one test at a time."""
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "compat"))
import sdk_clients as sdk  # noqa: E402
from harness import CLIENT_ID  # noqa: E402
from sdk_clients import ARM, check_tokens  # noqa: E402

ONLY_VARIANTS = ("plain",)   # one daemon at a time in the machine-wide directory
JS_KEY_DIR = "/var/opt/azcmagent/tokens"


def test_arc_javascript_client(ctx):
    created = not os.path.isdir(JS_KEY_DIR)
    os.makedirs(JS_KEY_DIR, exist_ok=True)
    try:
        d = ctx.daemon(extra=["--arc-key-dir", JS_KEY_DIR])
        res = sdk.run_js(ctx, "ManagedIdentityCredential", [ARM], sdk.arc_env(ctx, d.port))
        check_tokens(ctx, d.tenant, res, CLIENT_ID)
        d.stop()
    finally:
        if created:
            shutil.rmtree("/var/opt/azcmagent", ignore_errors=True)
