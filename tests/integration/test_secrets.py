"""Secrets never reach the log: not the service-account token, not any access token, at debug level;
and no copy of the service-account token stays in the daemon's memory."""
import harness
from harness import Skip, assert_token_ok, get_token, request, wait_for


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


def memory_of(pid, max_region=1 << 30):
    """The writable private memory of process pid (heap, anonymous mappings, stacks), per region.
    Regions over max_region are skipped: under ASan those are the sanitizer's shadow, reserved
    address space that holds no data of the program."""
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read().splitlines()
    with open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if not fields[1].startswith("rw") or hi - lo > max_region:
                continue
            try:
                mem.seek(lo)
                yield mem.read(hi - lo)
            except (OSError, ValueError, OverflowError):
                continue


def test_no_service_account_token_left_in_memory(ctx):
    """After its exchanges the daemon keeps no copy of the service-account token anywhere in its
    memory, freed or not: every buffer that carried it (the file read, the form, the HTTPS request
    and its TLS record) is zeroed before it is freed, grown, or its bytes moved. Under ASan freed
    blocks stay in quarantine with their content, so a copy left behind is found there."""
    if harness.VALGRIND:
        raise Skip("valgrind's own heap layout; the plain and ASan runs cover this")
    tenant = ctx.tenant("ok")
    d = ctx.daemon(tenant, log_level="info")
    tokens = [d.token.content]
    for i in range(3):
        res = f"https://memory{i}.example/"
        assert_token_ok(get_token(d.port, res), resource=res)
    tokens.append(d.token.rotate(newline=True))
    fp = harness.fingerprint(tokens[-1])
    wait_for(lambda: f"fp={fp}" in d.log(), 5, "the daemon to load the rotated token")
    assert_token_ok(get_token(d.port, "https://memory9.example/"), resource="https://memory9.example/")
    assert d.alive()
    found = []
    for region in memory_of(d.pid):
        for n, tok in enumerate(tokens):
            raw = tok.encode()
            for i in range(0, len(raw) - 32, 61):
                if raw[i:i + 32] in region:
                    found.append(f"token {n} bytes {i}..{i + 32}")
    assert not found, f"service-account token bytes in the daemon's memory: {found[:8]} ({len(found)} slices)"
