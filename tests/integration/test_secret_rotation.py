"""The App Service secret (--identity-header-file) rotates like any Kubernetes Secret: the kubelet
swaps a new ..data directory in; imdsd takes the new secret within SECRET_REREAD_MS (5 s) plus
SECRET_SETTLE_MS (1 s: a change counts once a second read finds the same), or SECRET_SETTLE_MS
after a SIGHUP, keeps accepting the previous one for --identity-header-overlap, logs both by
fingerprint only, and keeps the current one when the file turns bad. A file caught half-written
(truncated, then written) is never taken."""
import os
import signal
import time

import harness
from harness import fingerprint, log_events, request, wait_for

PATH = "/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fvault.azure.net"
A, B, C = "secret-A-0123456789", "secret-B-9876543210", "secret-C-5555555555"
REREAD_S, SETTLE_S = 5, 1   # SECRET_REREAD_MS, SECRET_SETTLE_MS


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
    assert time.monotonic() - t0 < REREAD_S + SETTLE_S + 2 * ctx.scale
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


def seen(d, nbytes):
    """A read found the file changed, nbytes long (not yet taken: it must read the same again)."""
    return any(e.get("bytes") == str(nbytes) for e in log_events(d.log(), "identity_header_changed"))


def test_half_written_secret_is_never_taken(ctx):
    """echo NEW > file truncates, then writes: a read in between finds a fragment, or nothing. The
    poll that finds either takes neither (nor calls an empty file unusable), and A keeps its
    overlap; the whole secret is taken once a read a second later finds the same."""
    path = os.path.join(ctx.tmp, "identity-header")
    with open(path, "w") as f:
        f.write(A + "\n")
    d = ctx.daemon(extra=["--identity-header-file", path])
    cut = B[:11]
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, cut.encode())
    # the periodic poll (no SIGHUP) reads the fragment; the rest is written right after
    wait_for(lambda: seen(d, len(cut)), REREAD_S + 3 * ctx.scale, "the poll to read the fragment")
    os.write(fd, B[len(cut):].encode() + b"\n")
    os.close(fd)
    assert status(d, A) == 200 and status(d, cut) == 401
    wait_for(lambda: rotated_to(d, B), SETTLE_S + 3 * ctx.scale, "the rotation to B")
    rot = log_events(d.log(), "identity_header_rotated")
    assert len(rot) == 1 and rot[0]["previous_fp"] == fingerprint(A), rot
    assert status(d, B) == 200 and status(d, A) == 200 and status(d, cut) == 401
    # truncated to nothing at a SIGHUP, then C written: no "is empty", and the previous one is B
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: seen(d, 0), 3 * ctx.scale, "the SIGHUP read to find the file empty")
    os.write(fd, C.encode())
    os.close(fd)
    wait_for(lambda: rotated_to(d, C), SETTLE_S + 3 * ctx.scale, "the rotation to C")
    rot = log_events(d.log(), "identity_header_rotated")
    assert len(rot) == 2 and rot[1]["previous_fp"] == fingerprint(B), rot
    assert not log_events(d.log(), "identity_header_unusable")
    assert status(d, C) == 200 and status(d, B) == 200 and status(d, A) == 401
    text = d.log()
    for s in (A, B, C, cut):
        assert s not in text, "a secret (or a piece of one) in the log"
