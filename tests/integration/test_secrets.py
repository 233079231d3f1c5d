"""Secrets never reach the log: not the service-account token, not any access token, at debug level."""
from harness import assert_token_ok, get_token, request


def windows(jwt, size=24, step=12):
    """Every 24-character slice (step 12) of the payload and signature: catches partial leaks too.
    The JWT header is not secret (every fake token shares it), so it is skipped."""
    for part in jwt.split(".")[1:]:
        for i in range(0, max(1, len(part) - size + 1), step):
            yield part[i:i + size]


def test_no_secrets_in_log_at_debug(ctx):
    tenant = ctx.tenant("ok")
    d = ctx.daemon(tenant, log_level="debug")
    sa_tokens = [d.token.content]
    assert_token_ok(get_token(d.port))
    assert_token_ok(get_token(d.port))                                   # cached hit
    ctx.fake.control(tenant, script=["aadsts-700016"])
    get_token(d.port, "https://vault.azure.net")                         # Entra error path
    ctx.fake.control(tenant, script=["garbage"])
    get_token(d.port, "https://storage.azure.com/")                      # unparseable answer
    sa_tokens.append(d.token.rotate())
    assert_token_ok(get_token(d.port, "https://database.windows.net/"), resource="https://database.windows.net/")
    get_token(d.port, headers={})
    request(d.port, "/readyz")
    d.stop()
    log = d.log()
    assert log.strip(), "nothing logged at --log-level debug"
    issued = [r["access_token"] for r in ctx.fake.records(tenant) if r["access_token"]]
    assert len(issued) >= 2
    for what, secrets in (("service-account token", sa_tokens), ("access token", issued)):
        for s in secrets:
            assert s not in log, f"a whole {what} appears in the daemon log"
            for w in windows(s):
                assert w not in log, f"part of a {what} ({w!r}) appears in the daemon log"
