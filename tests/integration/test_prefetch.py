"""--prefetch: the tokens an application will ask for are fetched at start, before any request, kept
fresh ahead of expiry, never evicted; /readyz (and READY=1 under systemd) waits for them and says
which one is missing and why; the application's first request is a cache hit."""
import json
import os
import signal

import harness
from harness import (CLIENT_ID, RESOURCE, KubeletToken, assert_token_ok, free_port, get_token, log_events,
                     make_jwt, request, wait_for)
from test_systemd import notify_socket

CLIENT2 = "0a1b2c3d-0000-4000-8000-00000000000a"
OBJECT2 = "99999999-8888-4777-8666-555555555555"   # an object id --identity-alias maps to CLIENT2
VAULT = "https://vault.azure.net"
STORAGE = "https://storage.azure.com"


def metric(port, name):
    r = request(port, "/metrics")
    assert r.status == 200, r
    for line in r.body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def readyz(port):
    """(status, JSON) of /readyz; (None, None) while nothing listens yet."""
    try:
        r = request(port, "/readyz")
    except ConnectionRefusedError:
        return None, None
    return r.status, r.json


def test_prefetch_before_any_request(ctx):
    """Three keys (the default identity, an --allow-client-id by client id and by an alias's object
    id) are fetched with no request; readiness counts them; each first request is a cache hit that
    asks Entra nothing more; and the exchange left a kept-alive connection that the first request
    for another resource reuses (no new TCP or TLS handshake)."""
    health = free_port()
    d = ctx.daemon(extra=["--allow-client-id", CLIENT2, "--identity-alias", f"{OBJECT2}={CLIENT2}",
                          "--health-listen", f"127.0.0.1:{health}", "--prefetch", RESOURCE,
                          "--prefetch", f"{CLIENT2}={VAULT}", "--prefetch", f"{OBJECT2}={STORAGE}"])
    wait_for(lambda: readyz(d.port)[0] == 200, 10, "readiness with the prefetched tokens")
    status, body = readyz(d.port)
    assert body["status"] == "ready" and body["prefetch"] == {"tokens": 3, "ready": 3}, body
    recs = ctx.fake.records(d.tenant)
    assert sorted((r["client_id"], r["scope"]) for r in recs) == sorted(
        [(CLIENT_ID, RESOURCE + "/.default"), (CLIENT2, VAULT + "/.default"), (CLIENT2, STORAGE + "/.default")]), recs
    assert [e["resource"] for e in log_events(d.log(), "token_prefetch")] == [RESOURCE, VAULT, STORAGE]
    hits, misses = metric(health, "imdsd_cache_hits_total"), metric(health, "imdsd_cache_misses_total")
    assert (hits, misses) == (0, 0)
    assert_token_ok(get_token(d.port))
    assert_token_ok(get_token(d.port, resource=VAULT, client_id=CLIENT2), resource=VAULT, client_id=CLIENT2)
    r = request(d.port, f"/metadata/identity/oauth2/token?api-version=2018-02-01&resource={STORAGE}"
                        f"&object_id={OBJECT2}", {"Metadata": "true"})
    assert_token_ok(r, resource=STORAGE, client_id=CLIENT2)
    assert metric(health, "imdsd_cache_hits_total") == 3 and metric(health, "imdsd_cache_misses_total") == 0
    assert len(ctx.fake.records(d.tenant)) == 3, "a prefetched key was exchanged again"
    # warm: the next exchange (a resource not prefetched) runs on a connection the prefetch opened
    assert_token_ok(get_token(d.port, resource="https://graph.microsoft.com"),
                    resource="https://graph.microsoft.com")
    recs = ctx.fake.records(d.tenant)
    assert recs[-1]["conn"] in {r["conn"] for r in recs[:3]}, recs
    # and the TLS session: a connection opened later resumes it (an abbreviated handshake). Each
    # answer takes 0.5 s, so the 8 requests are in flight together and need new connections (with
    # quick answers, the kept-alive ones can serve them one after another: seen on a loaded machine)
    ctx.fake.control(d.tenant, script=["slow-0.5"] * 8)
    many = harness.concurrently(8, lambda i: get_token(d.port, resource=f"https://r{i}.example.com"))
    assert all(r.status == 200 for r in many), many
    done = log_events(d.log(), "tls_handshake_done")
    assert done[0]["resumed"] == "0" and any(e["resumed"] == "1" for e in done[1:]), done


def test_prefetch_readiness_waits_and_says_why(ctx):
    """No token file at start, then Entra failing: /readyz is 503 and names what is missing, and
    why; the daemon keeps asking (once a second for the file, with backoff for Entra) and becomes
    ready by itself, with no request."""
    tenant = ctx.tenant("ok")
    token = KubeletToken(os.path.join(ctx.tmp, "late-token"), create=False)
    d = ctx.daemon(tenant, token, extra=["--prefetch", RESOURCE], wait=False)
    wait_for(lambda: "does not exist" in (readyz(d.port)[1] or {}).get("error_description", ""), 5,
             "/readyz naming the missing token file")
    status, body = readyz(d.port)
    assert status == 503 and body["status"] == "not_ready", body
    assert body["prefetch"] == {"tokens": 1, "ready": 0}, body
    ctx.fake.control(tenant, script=["http503", "http503"], token_file=token.path)
    token.rotate(make_jwt())

    def says_entra():
        s, b = readyz(d.port)
        return s == 503 and b["token_file"]["state"] == "ok" and b
    b = wait_for(says_entra, 5, "the token file read, Entra failing")
    desc = b["error_description"]
    assert f"resource={RESOURCE}" in desc and CLIENT_ID in desc, desc
    wait_for(lambda: readyz(d.port)[0] == 200, 15, "ready once Entra answers")
    assert [r["status"] for r in ctx.fake.records(tenant)] == [503, 503, 200]
    assert_token_ok(get_token(d.port))
    assert len(ctx.fake.records(tenant)) == 3


def test_prefetch_refreshed_ahead_without_requests(ctx):
    """A prefetched token is refreshed when due (here Entra's refresh_in of 2 s), with no request."""
    tenant = ctx.tenant("ok-exp3600-ref2")
    d = ctx.daemon(tenant, extra=["--prefetch", RESOURCE])
    wait_for(lambda: len(ctx.fake.records(tenant)) >= 2, 10 * ctx.scale, "the refresh")
    first, second = ctx.fake.records(tenant)[:2]
    assert second["time"] - first["time"] >= 1.0, (first["time"], second["time"])   # due, not at once
    assert readyz(d.port)[0] == 200
    r = get_token(d.port)
    assert_token_ok(r)
    assert r.json["access_token"] == ctx.fake.records(tenant)[-1]["access_token"]


def test_prefetch_ready_waits_under_systemd(ctx):
    """Type=notify: READY=1 comes once the prefetched token is in hand (STATUS= says what it waits
    for until then), not when the listener opens."""
    n = notify_socket(ctx)
    tenant = ctx.tenant("ok")
    d = ctx.daemon(tenant, env=n.env(), extra=["--prefetch", RESOURCE], wait=False, start=False)
    ctx.fake.control(tenant, script=["slow-1"])   # Entra takes a second to answer
    d.start(wait=False)
    waiting = n.wait(lambda m: m.get("STATUS", "").startswith("waiting for 1 of 1 prefetched tokens"), 5,
                     "STATUS=waiting for the prefetched token")
    assert "READY" not in waiting, waiting
    assert all("READY" not in m for _, m in n.messages), n.messages
    assert "being fetched" in waiting["STATUS"], waiting
    ready = n.wait(lambda m: m.get("READY") == "1", 10, "READY=1")
    assert ready["STATUS"] == "serving tokens", ready
    (rec,) = ctx.fake.records(tenant)   # the token READY=1 waited for
    assert rec["status"] == 200
    assert_token_ok(get_token(d.port))
    os.kill(d.pid, signal.SIGHUP)
    n.wait(lambda m: m.get("READY") == "1", 5, "READY=1 after the reload")


def test_prefetch_from_the_environment(ctx):
    """IMDSD_PREFETCH (an image made FROM imdsd's sets it for the sidecar the webhook injects, which
    gets only the webhook's flags): several keys, separated by spaces or commas; a flag wins."""
    d = ctx.daemon(env={"IMDSD_PREFETCH": f"{RESOURCE}, {VAULT}\t{CLIENT_ID}={STORAGE}"})
    wait_for(lambda: readyz(d.port)[0] == 200, 10, "readiness")
    assert readyz(d.port)[1]["prefetch"] == {"tokens": 3, "ready": 3}
    d2 = ctx.daemon(env={"IMDSD_PREFETCH": f"{RESOURCE} {VAULT}"}, extra=["--prefetch", STORAGE])
    wait_for(lambda: readyz(d2.port)[0] == 200, 10, "readiness")
    assert readyz(d2.port)[1]["prefetch"] == {"tokens": 1, "ready": 1}
    assert [e["resource"] for e in log_events(d2.log(), "token_prefetch")] == [STORAGE]


def test_prefetch_bad_settings(ctx):
    """Each refused with one line naming --prefetch and the value, exit 2."""
    tok = ctx.token()
    base = ["--client-id", CLIENT_ID, "--tenant-id", "t", "--token-file", tok.path]
    cases = [
        ([f"--prefetch={CLIENT2}={VAULT}"], "names an identity imdsd does not serve"),
        (["--allow-resource", "https://vault.azure.net", "--prefetch", RESOURCE], "--allow-resource refuses"),
        (["--prefetch", RESOURCE, "--prefetch", f"{CLIENT_ID}={RESOURCE}"], "is given twice"),
        (["--prefetch", "https://has space"], "no spaces"),
        (["--prefetch", "/subscriptions/x=https://vault.azure.net"], "names an identity imdsd does not serve"),
        (["--prefetch", ""], "--prefetch"),
    ]
    for extra, why in cases:
        rc, out, err = ctx.run(base + extra)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "--prefetch" in lines[0] and why in lines[0], (extra, rc, err)
    too_many = []
    for i in range(17):
        too_many += ["--prefetch", f"https://r{i}.example.com"]
    rc, out, err = ctx.run(base + too_many)
    assert rc == 2 and "--prefetch" in err and "16" in err, err
    rc, out, err = ctx.run(base, env={"IMDSD_PREFETCH": " ".join(too_many[1::2])})
    assert rc == 2 and err.strip() == "imdsd: IMDSD_PREFETCH: at most 16 tokens", err
    rc, out, err = ctx.run(base, env={"IMDSD_PREFETCH": f"{RESOURCE},{CLIENT2}={VAULT}"})
    assert rc == 2 and err.startswith("imdsd: --prefetch / IMDSD_PREFETCH: ") and CLIENT2 in err, err
