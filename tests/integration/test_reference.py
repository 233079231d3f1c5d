"""Behaviour the reference (imds-protocol.md) asks for beyond the daemon's written contract.

A failure here is a gap against the reference (sections 3.4, 3.6 and trap T9), not against the
contract: expiry computed from the request time, and 429 Retry-After throttling.
"""
import time

from harness import assert_json_error, assert_token_ok, get_token, wait_for


def test_expires_on_from_request_time(ctx):
    """expires_on = time the request was sent + expires_in, not the time the answer came back."""
    d = ctx.daemon(ctx.tenant("slow-2"))
    t0 = time.time()
    j = assert_token_ok(get_token(d.port))
    assert t0 + 3599 - 2 <= int(j["expires_on"]) <= t0 + 3599 + 1, \
        f"expires_on {j['expires_on']} vs request time {t0:.0f} + 3599 (Entra answered 2 s later)"


def test_entra_429_throttles_identical_requests(ctx):
    """After Entra's 429 + Retry-After: 7, identical requests wait it out instead of hammering Entra."""
    tenant = ctx.tenant("ok")
    ctx.fake.control(tenant, script=["http429"])
    d = ctx.daemon(tenant, extra=["--entra-timeout", "3"])
    assert_json_error(get_token(d.port, timeout=30), 429)
    r = get_token(d.port, timeout=30)
    assert ctx.fake.calls(tenant) == 1, f"Entra called {ctx.fake.calls(tenant)} times within its Retry-After"
    assert_json_error(r, 429)
    ra = r.headers.get("retry-after", "")
    assert ra.isdigit() and 1 <= int(ra) <= 7, f"Retry-After {ra!r}, want the time left of Entra's 7 s"
