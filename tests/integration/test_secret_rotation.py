"""The App Service secret (--identity-header-file) rotates like any Kubernetes Secret: the kubelet
swaps a new ..data directory in; imdsd takes the new secret within SECRET_REREAD_MS (5 s) or at
once on SIGHUP, keeps accepting the previous one for --identity-header-overlap, logs both by
fingerprint only, and keeps the current one when the file turns bad."""
import os
import signal
import time

import harness
from harness import fingerprint, log_events, request, wait_for

PATH = "/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fvault.azure.net"
A, B, C = "secret-A-0123456789", "secret-B-9876543210", "secret-C-5555555555"


def status(d, secret, header="X-IDENTITY-HEADER"):
    return request(d.port, PATH, {header: secret}).status


def rotated_to(d, new):
    return any(e.get("fp") == fingerprint(new) for e in log_events(d.log(), "identity_header_rotated"))


def test_secret_rotation_with_overlap(ctx):
    vol = harness.KubeletToken(os.path.join(ctx.tmp, "secret-volume"), content=A + "\n")
    d = ctx.daemon(extra=["--identity-header-file", vol.path, "--identity-header-overlap", "2"])
    assert status(d, A) == 200 and status(d, B) == 401
    # the poll picks the new secret up by itself
    t0 = time.monotonic()
    vol.rotate(B)
    wait_for(lambda: rotated_to(d, B), 8, "the rotation to B in the log")
    assert time.monotonic() - t0 < 5 + 2 * ctx.scale
    rec = [e for e in log_events(d.log(), "identity_header_rotated") if e["fp"] == fingerprint(B)][0]
    assert rec["previous_fp"] == fingerprint(A) and rec["previous_valid_s"] == "2", rec
    assert status(d, B) == 200 and status(d, A) == 200, "the previous secret is refused during the overlap"
    assert status(d, B, "secret") == 200, "the 2017-09-01 header does not follow the rotation"
    wait_for(lambda: status(d, A) == 401, 4, "the previous secret to expire after its overlap")
    assert status(d, B) == 200
    # SIGHUP reads it at once; a bad file keeps the current secret
    vol.rotate(C)
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: rotated_to(d, C), 3, "the rotation to C after SIGHUP")
    assert status(d, C) == 200
    vol.rotate("   \n")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: log_events(d.log(), "identity_header_unusable"), 3, "the empty file noticed")
    assert status(d, C) == 200 and status(d, "") == 401
    bad = log_events(d.log(), "identity_header_unusable")[0]
    assert bad["reason"] == "is empty" and bad["action"] == "keep_current", bad
    text = d.log()
    for s in (A, B, C):
        assert s not in text, "a secret in the log"
