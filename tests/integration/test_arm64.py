"""The arm64 image's binary (build/arm64/imdsd, cross-compiled by make image) run here under Debian's
qemu-aarch64-static, as the amd64 build runs in the other modules: the real Python SDK gets tokens
through it from the stand-in Entra over TLS, and a kubelet-style rotation of the token volume reaches
it. test_image.py checks its ELF header, static linking and hardening, and that it is the binary in
the image index. Skipped only when make image built amd64 alone (IMAGE_ARCHS=amd64)."""
import os
import sys

import harness
import podman
from harness import CLIENT_ID, KubeletToken, wait_for

sys.path.insert(0, os.path.join(harness.HERE, "..", "compat"))
import sdk_clients as sdk  # noqa: E402
from sdk_clients import ARM, GRAPH, VAULT, check_tokens  # noqa: E402

ONLY_VARIANTS = ("plain",)   # one binary, the image's
MIC, DAC = "ManagedIdentityCredential", "DefaultAzureCredential"


def loaded(d, fp):
    return any(e.get("fp") == fp for e in harness.log_events(d.log(), "token_file_loaded"))


def test_arm64_binary_serves_the_sdk_and_follows_rotation(ctx):
    qemu = podman.require_arm64()
    tok = KubeletToken(os.path.join(ctx.tmp, "tokens"))
    d = ctx.daemon(token=tok, start=False, prefix=[qemu], binary=podman.ARM64_BINARY)
    d.start(timeout=20)   # emulated: start-up, and the TLS handshakes, are slower
    # it is the arm64 build, emulated: qemu's process running build/arm64/imdsd
    with open(f"/proc/{d.pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert os.path.realpath(f"/proc/{d.pid}/exe") == os.path.realpath(qemu), os.readlink(f"/proc/{d.pid}/exe")
    assert argv[1].decode() == podman.ARM64_BINARY, argv[:2]
    env = sdk.imds_env(ctx, d.port)
    first = sdk.run_py(ctx, MIC, [ARM, VAULT], env)
    recs = check_tokens(ctx, d.tenant, first, CLIENT_ID)
    assert {r["assertion_sha256"] for r in recs.values()} == {tok.rotations[-1]["sha256"]}, "not the token file's"
    # the kubelet's atomic writer swaps ..data: the next exchange presents the new token
    tok.rotate()
    wait_for(lambda: loaded(d, tok.rotations[-1]["fp"]), 10, "event=token_file_loaded for the rotated token")
    second = sdk.run_py(ctx, DAC, [GRAPH, ARM], env)
    recs2 = check_tokens(ctx, d.tenant, second, CLIENT_ID)
    assert recs2[GRAPH]["assertion_sha256"] == tok.rotations[-1]["sha256"], "the old token was presented"
    assert second[1]["token"] == first[0]["token"], "the cached token did not survive the rotation"
    assert ctx.fake.calls(d.tenant) == 3, f"the fake saw {ctx.fake.calls(d.tenant)} exchanges, want 3"
    log = d.log()
    assert tok.content not in log and first[0]["token"] not in log, "a secret in the log"


test_arm64_binary_serves_the_sdk_and_follows_rotation.timeout = 120
