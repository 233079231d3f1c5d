"""Resilience (issue 5): retries, throttling, deadlines, serving through outages, background
refresh, the exchange cap and graceful shutdown, by fault injection at the stand-in Entra.

Every test checks what clients see and how many calls reached Entra (the fake's JSON log, whose
"time" is when a request arrived). Timing rules under test (include/refresh.h):
  refresh at Entra's refresh_in, else at half-life, up to 10% earlier (jitter);
  serve until 15 s before expiry (a quarter of the lifetime below 60 s);
  full-jitter backoff u * 1 s * 2^attempt, capped at 8 s with a client waiting, 5 min without;
  a permanent error is repeated for 30 s without asking; 429 holds identical requests for its
  Retry-After; at most 8 exchanges at once; entries unused for a token lifetime are dropped.
Short lifetimes come from the fake's ok-expN / ok-refN tenants. The daemon's clock does not slow
down under valgrind, so the bounds of a rule stay as they are; only the slack for our own
observation latency (slack()) grows with ctx.scale. Times from obtaining a token to refreshing it
are taken from the daemon's own log (daemon_times), so that TLS set-up cannot blur them.
Measured figures go to measurements.jsonl in each test's artefact directory (pytest --keep).
"""
import json
import os
import signal
import socket
import subprocess
import threading
import time

from harness import (assert_json_error, assert_token_ok, check_tool_output, concurrently, get_token,
                     log_events, log_ts, request, wait_for)


def slack(ctx, s=0.3):
    """Allowance for latency on our side (thread wake-up, TLS, token file read), per ctx.scale."""
    return s * ctx.scale


TICK = 0.005   # rounding of the daemon's millisecond log timestamps


def scope(resource):
    return resource + "/.default"


def calls_for(ctx, tenant, resource=None):
    """The fake's records for tenant (and resource), oldest first."""
    recs = ctx.fake.records(tenant)
    if resource is not None:
        recs = [x for x in recs if x["scope"] == scope(resource)]
    return sorted(recs, key=lambda x: x["time"])


def note(ctx, **kv):
    """Measured figures, kept with the test's artefacts (measurements.jsonl; run.py --keep)."""
    with open(os.path.join(ctx.tmp, "measurements.jsonl"), "a") as f:
        f.write(json.dumps(kv) + "\n")


_START = threading.Lock()


def start(ctx, behaviour, script=None, **kw):
    """A fresh tenant (with its first answers scripted) and a daemon for it; safe from threads."""
    with _START:
        tenant = ctx.tenant(behaviour)
        if script:
            ctx.fake.control(tenant, script=script)
        return tenant, ctx.daemon(tenant, **kw)


def daemon_times(d):
    """By the daemon's clock, from its log: resource -> (times it sent exchanges that brought a
    token: the entra_token line's time minus duration_ms, i.e. the time a token's life counts
    from; times a refresh was started: token_refresh lines). Rules about the time from obtaining
    to refreshing are checked on these, free of the TLS set-up that delays the fake's record of
    a first exchange (by seconds under valgrind)."""
    out = {}
    for e in log_events(d.log()):
        res = e.get("resource")
        if e.get("event") == "entra_token":
            out.setdefault(res, ([], []))[0].append(log_ts(e) - int(e["duration_ms"]) / 1000)
        elif e.get("event") == "token_refresh":
            out.setdefault(res, ([], []))[1].append(log_ts(e))
    return out


def refresh_delays(d, res):
    """Seconds from obtaining each token of res to starting its refresh, by the daemon's clock."""
    sent, refreshed = daemon_times(d).get(res, ([], []))
    return [r - s for s, r in zip(sent, refreshed)]


def parallel(**scenarios):
    """Runs each scenario in its own thread; returns their values by name, or re-raises the first
    failure (its message prefixed with the scenario's name)."""
    results, errors = {}, {}

    def run(name, fn):
        try:
            results[name] = fn()
        except BaseException as e:  # noqa: B902 - handed to the caller
            errors[name] = e
    threads = [threading.Thread(target=run, args=item, daemon=True) for item in scenarios.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, e in errors.items():
        e.args = (f"[{name}] {e.args[0] if e.args else type(e).__name__}",) + tuple(e.args[1:])
        raise e
    return results


def poll(port, resource, until, every=0.2, timeout=20):
    """Requests resource until time.time() >= until; returns [(t_start, t_end, Resp)]."""
    out = []
    while time.time() < until:
        t0 = time.time()
        r = get_token(port, resource, timeout=timeout)
        out.append((t0, time.time(), r))
        time.sleep(max(0.0, every - (time.time() - t0)))
    return out


def assert_fresh(ctx, r, resource, t_start, t_end, min_left=1):
    """A 200 with a token that has at least min_left seconds left and a consistent expires_in."""
    j = assert_token_ok(r, resource=resource)
    assert "refresh_in" not in j and "refresh_on" not in j, f"refresh_in reached the client: {j}"
    left = int(j["expires_in"])
    assert left >= min_left, f"served a token with expires_in={left} (want >= {min_left})"
    on = int(j["expires_on"])
    assert on - t_end - 1.5 <= left <= on - t_start + 1.5, \
        f"expires_in {left} does not count down to expires_on {on} (asked at {t_start:.1f})"
    return j


# ---- transient failures are retried, within the client's wait ---------------------------------------

def test_retry_500_then_ok(ctx):
    tenant, d = start(ctx, "ok", ["http500"])
    t0 = time.time()
    r = get_token(d.port, timeout=30)
    took = time.time() - t0
    j = assert_token_ok(r)
    recs = calls_for(ctx, tenant)
    assert [x["status"] for x in recs] == [500, 200], f"the fake answered {[x['status'] for x in recs]}"
    assert j["access_token"] == recs[1]["access_token"], "the client did not get the retry's token"
    gap = recs[1]["time"] - recs[0]["time"]
    assert gap <= 1.0 + slack(ctx), f"first retry after {gap:.2f}s, the backoff allows at most 1 s"
    assert took <= 1.0 + 2 * slack(ctx), f"the client waited {took:.2f}s"
    time.sleep(1.5)
    assert ctx.fake.calls(tenant) == 2, f"{ctx.fake.calls(tenant)} Entra calls, want 2"
    note(ctx, retry_500_gap_s=round(gap, 3), client_wait_s=round(took, 3))


def test_transient_kinds_then_ok(ctx):
    """Each kind of transient failure, then a success: one client request, a 200, two calls, the
    retry within the first backoff (1 s); and a chain of three different failures, each retried
    within its backoff ceiling (1, 2, 4 s), ending in a 200 for the one waiting client."""
    def one(kind):
        tenant, d = start(ctx, "ok", [kind])
        t0 = time.time()
        r = get_token(d.port, timeout=30)
        took = time.time() - t0
        assert r.status == 200, f"{kind} then ok: the client got {r!r}"
        j = assert_token_ok(r)
        recs = calls_for(ctx, tenant)
        assert len(recs) == 2, f"{kind} then ok: {len(recs)} Entra calls, want 2"
        assert recs[0]["behaviour"] == kind and recs[1]["status"] == 200, [x["behaviour"] for x in recs]
        assert j["access_token"] == recs[1]["access_token"]
        return round(recs[1]["time"] - recs[0]["time"], 3), round(took, 3)

    def chain():
        kinds = ["http503", "reset", "garbage"]  # 1 + 2 + 4 s of backoff at most
        tenant, d = start(ctx, "ok", kinds, extra=["--entra-timeout", "20"])
        r = get_token(d.port, timeout=30)
        j = assert_token_ok(r)
        recs = calls_for(ctx, tenant)
        assert [x["behaviour"] for x in recs] == kinds + ["ok"], [x["behaviour"] for x in recs]
        assert j["access_token"] == recs[-1]["access_token"]
        gaps = [recs[k + 1]["time"] - recs[k]["time"] for k in range(len(recs) - 1)]
        for k, g in enumerate(gaps):
            assert g <= 2 ** k + slack(ctx), f"retry {k + 1} after {g:.2f}s; the backoff allows {2 ** k} s"
        return [round(g, 3) for g in gaps]

    kinds = ["reset", "garbage", "truncated", "http503", "aadsts-70021", "big", "nojson-token"]
    out = parallel(chain=chain, **{k: (lambda k=k: one(k)) for k in kinds})
    time.sleep(1)
    for k in kinds:
        assert out[k][0] <= 1.0 + slack(ctx), f"{k}: retried after {out[k][0]}s, backoff allows 1 s"
    note(ctx, first_retry_gap_and_wait_s={k: out[k] for k in kinds}, chain_gaps_s=out["chain"])


# ---- 429 + Retry-After -----------------------------------------------------------------------------

def test_429_retry_after(ctx):
    def waiting_client():
        """Default deadline (15 s) beyond the Retry-After (7 s): the client waits and gets a token;
        an identical request meanwhile gets 429 at once and Entra is not called before 7 s."""
        tenant, d = start(ctx, "ok", ["http429"])
        box = {}

        def first():
            t = time.time()
            box["r"] = get_token(d.port, timeout=30)
            box["took"] = time.time() - t
        th = threading.Thread(target=first, daemon=True)
        th.start()
        wait_for(lambda: ctx.fake.calls(tenant) == 1, 5, "the 429")
        t429 = calls_for(ctx, tenant)[0]["time"]
        time.sleep(max(0.0, t429 + 1.5 - time.time()))
        t = time.time()
        r2 = get_token(d.port, timeout=30)
        took2 = time.time() - t
        assert_json_error(r2, 429)
        ra = r2.headers.get("retry-after", "")
        assert ra.isdigit() and 1 <= int(ra) <= 7, f"Retry-After {ra!r} during Entra's 7 s"
        assert took2 < 1 * ctx.scale, f"the identical request waited {took2:.1f}s instead of a 429 at once"
        time.sleep(max(0.0, t429 + 6.5 - time.time()))
        assert ctx.fake.calls(tenant) == 1, "Entra was called again within its Retry-After"
        th.join(15 * ctx.scale)
        assert not th.is_alive(), "the waiting client never got an answer"
        assert_token_ok(box["r"])
        recs = calls_for(ctx, tenant)
        assert [x["status"] for x in recs] == [429, 200], [x["status"] for x in recs]
        gap = recs[1]["time"] - recs[0]["time"]
        assert 7.0 - 0.05 <= gap <= 7.0 + slack(ctx), f"retried {gap:.2f}s after the 429, want 7 s"
        assert 6.5 <= box["took"] <= 7.0 + 2 * slack(ctx), f"the waiting client took {box['took']:.2f}s"
        return round(gap, 3), round(box["took"], 3)

    def short_deadline():
        """--entra-timeout 3 ends before the Retry-After: 429 at once, repeated without Entra until
        the 7 s pass, then Entra is asked again. Other resources are not held."""
        tenant, d = start(ctx, "ok", ["http429"], extra=["--entra-timeout", "3"])
        t = time.time()
        r = get_token(d.port, timeout=30)
        took = time.time() - t
        assert_json_error(r, 429)
        assert took < 1 * ctx.scale, f"429 after {took:.1f}s; the deadline is before the Retry-After"
        ra = r.headers.get("retry-after", "")
        assert ra.isdigit() and 6 <= int(ra) <= 7, f"Retry-After {ra!r}, want Entra's 7"
        t429 = calls_for(ctx, tenant)[0]["time"]
        seen = [int(ra)]
        other = "https://vault.azure.net"
        for _ in range(9):
            time.sleep(0.7)
            if time.time() > t429 + 6.0:     # the daemon holds until its own receipt of the 429 + 7 s
                break
            if len(seen) == 2:
                assert_token_ok(get_token(d.port, other, timeout=30), resource=other)
            t = time.time()
            r = get_token(d.port, timeout=30)
            assert_json_error(r, 429)
            assert time.time() - t < 1 * ctx.scale, "a held 429 was not answered at once"
            ra = r.headers.get("retry-after", "")
            assert ra.isdigit() and 1 <= int(ra) <= seen[-1], f"Retry-After {ra!r} after {seen}"
            seen.append(int(ra))
        assert len(calls_for(ctx, tenant, "https://management.azure.com/")) == 1, \
            "identical requests reached Entra within its Retry-After"
        assert len(calls_for(ctx, tenant, other)) == 1, "another resource was held by the 429"
        time.sleep(max(0.0, t429 + 7.3 - time.time()))
        assert_token_ok(get_token(d.port, timeout=30))
        recs = calls_for(ctx, tenant, "https://management.azure.com/")
        assert [x["status"] for x in recs] == [429, 200], [x["status"] for x in recs]
        assert recs[1]["time"] - recs[0]["time"] >= 7.0 - 0.05
        return seen

    out = parallel(waiting=waiting_client, short=short_deadline)
    note(ctx, waiting_retry_gap_and_client_wait_s=out["waiting"], short_retry_after_seen=out["short"])


# ---- a slow Entra past the deadline ------------------------------------------------------------------

def test_slow_entra_deadline(ctx):
    tenant = ctx.tenant("slow-30")
    d = ctx.daemon(tenant, extra=["--entra-timeout", "2"])
    health = {}

    def probe():
        time.sleep(1)
        t = time.time()
        health["status"] = request(d.port, "/healthz", timeout=5).status
        health["took"] = time.time() - t
    th = threading.Thread(target=probe, daemon=True)
    th.start()
    t0 = time.time()
    r = get_token(d.port, timeout=40)
    took = time.time() - t0
    th.join(5 * ctx.scale)
    assert_json_error(r, 503)
    ra = r.headers.get("retry-after", "")
    assert ra.isdigit() and int(ra) >= 1, f"503 without an integer Retry-After: {ra!r}"
    assert 1.8 <= took <= 2 + 3 * slack(ctx), f"answered after {took:.2f}s with --entra-timeout 2"
    assert health.get("status") == 200 and health["took"] < 0.5 * ctx.scale, \
        f"/healthz while an exchange was stuck: {health}"
    time.sleep(1.5)
    assert ctx.fake.calls(tenant) == 1, f"{ctx.fake.calls(tenant)} Entra calls after the deadline, want 1"
    # still serving: another stuck request is bounded the same way, and a recovered Entra works at once
    t0 = time.time()
    assert_json_error(get_token(d.port, "https://vault.azure.net", timeout=40), 503)
    assert time.time() - t0 <= 2 + 3 * slack(ctx)
    ctx.fake.control(tenant, default="ok")
    t0 = time.time()
    assert_token_ok(get_token(d.port, timeout=30))
    assert time.time() - t0 < 1 * ctx.scale, "the first request after Entra recovered was slow"
    note(ctx, deadline_503_after_s=round(took, 3))


# ---- permanent AADSTS errors: no retry storm ---------------------------------------------------------

def test_permanent_errors_no_storm(ctx):
    def one(code, error, check_hold_end=False):
        _, d = start(ctx, f"aadsts-{code}")
        descs = []
        t_first = None
        for i in range(6):                          # six identical requests over ~3 s
            t = time.time()
            r = get_token(d.port, timeout=30)
            t_first = t_first or time.time()
            assert_json_error(r, 400, error, f"AADSTS{code}")
            assert "retry-after" not in r.headers, "a 400 must not carry Retry-After"
            assert time.time() - t < 1 * ctx.scale, f"request {i + 1} took {time.time() - t:.1f}s"
            descs.append(r.json["error_description"])
            if i == 0:
                time.sleep(0.3)
                assert ctx.fake.calls(d.tenant) == 1, f"a permanent error was retried: {ctx.fake.calls(d.tenant)} calls"
            time.sleep(0.5)
        assert len(set(descs)) == 1, f"the held answer differs from Entra's: {descs}"
        assert ctx.fake.calls(d.tenant) == 1, f"{ctx.fake.calls(d.tenant)} Entra calls for 6 requests, want 1"
        other = "https://vault.azure.net"          # the hold is per resource
        assert_json_error(get_token(d.port, other, timeout=30), 400, error)
        assert len(calls_for(ctx, d.tenant, other)) == 1
        if check_hold_end:                          # and it ends after 30 s
            time.sleep(max(0.0, t_first + 25 - time.time()))
            assert_json_error(get_token(d.port, timeout=30), 400, error)
            assert len(calls_for(ctx, d.tenant, "https://management.azure.com/")) == 1, "hold ended early"
            time.sleep(max(0.0, t_first + 30.5 - time.time()))
            assert_json_error(get_token(d.port, timeout=30), 400, error)
            n = len(calls_for(ctx, d.tenant, "https://management.azure.com/"))
            assert n == 2, f"{n} calls: the held 400 was not asked again after 30 s"
    parallel(**{"700016": lambda: one(700016, "unauthorized_client", check_hold_end=True),
                "90002": lambda: one(90002, "invalid_request"),
                "500011": lambda: one(500011, "invalid_resource"),
                "70011": lambda: one(70011, "invalid_scope")})
test_permanent_errors_no_storm.timeout = 60


# ---- an outage while tokens are cached ---------------------------------------------------------------

def test_outage_serves_cached_tokens(ctx):
    """ok-exp30: serve-until is 30 - 7.5 = 22.5 s after the request to Entra, the refresh due at
    13.5..15 s. Entra fails from just after the first tokens on: the cached tokens are served until
    serve-until and never after, retries run in the background with growing gaps, then 503."""
    life, serve, n = 30, 22.5, 8
    tenant = ctx.tenant(f"ok-exp{life}")
    d = ctx.daemon(tenant, extra=["--entra-timeout", "2"])
    resources = [f"https://outage-{i}.example.com" for i in range(n)]
    first = [get_token(d.port, res, timeout=30) for res in resources]   # one by one: valgrind meets the 2 s
    for res, r in zip(resources, first):
        assert_token_ok(r, resource=res)
    ctx.fake.control(tenant, default="http503")
    issued = {res: calls_for(ctx, tenant, res) for res in resources}
    assert all(len(v) == 1 for v in issued.values()), "not one Entra call per resource"
    times = daemon_times(d)
    t_obtained = {res: times[res][0][0] for res in resources}    # the daemon's serve-until counts from these
    end = max(t_obtained.values()) + serve + 3.5
    health = []

    def probe():
        while time.time() < end:
            t = time.time()
            r = request(d.port, "/healthz", timeout=20)
            health.append((t, time.time() - t, r.status))
            time.sleep(0.1)
    polls = parallel(healthz=probe,
                     **{res: (lambda res=res: poll(d.port, res, end, every=0.3)) for res in resources})

    # the daemon stays responsive while its refreshes fail and back off
    slow = [(round(t - min(t_obtained.values()), 1), round(dt, 2)) for t, dt, _ in health if dt > 0.5 * ctx.scale]
    assert not slow, f"/healthz answered slowly during background retries (at s, took s): {slow}"
    for res in resources:
        slow = [(round(a - t_obtained[res], 1), round(b - a, 2)) for a, b, r in polls[res]
                if r.status == 200 and b - a > 0.5 * ctx.scale]
        assert not slow, f"{res}: cached token answered slowly during background retries (at s, took s): {slow}"

    figures = {"first_retry_after_s": [], "gaps_s": []}
    grown = 0
    for res, r0 in zip(resources, first):
        tok0, t_ob, until = r0.json["access_token"], t_obtained[res], t_obtained[res] + serve
        last_ok, fails_after = 0.0, 0
        for t_start, t_end, r in polls[res]:
            if r.status == 200:
                j = assert_fresh(ctx, r, res, t_start, t_end, min_left=6)
                assert j["access_token"] == tok0, "a token Entra never issued was served"
                assert t_start < until + 0.05, \
                    f"{res}: served at {t_start - t_ob:.2f}s, after serve-until ({serve}s)"
                last_ok = max(last_ok, t_start)
            else:
                assert_json_error(r, 503)
                assert t_start > until - 2 * slack(ctx), \
                    f"{res}: 503 at {t_start - t_ob:.2f}s while the cached token was still servable"
                fails_after += 1
        assert last_ok >= until - 0.3 - 2 * slack(ctx), \
            f"{res}: the cached token stopped being served at {last_ok - t_ob:.2f}s, serve-until is {serve}s"
        assert fails_after >= 2, f"{res}: only {fails_after} answers after serve-until"
        bg = [x for x in calls_for(ctx, tenant, res)[1:] if x["time"] < until]
        assert bg, f"{res}: no background refresh before serve-until"
        due = refresh_delays(d, res)[0]
        assert 13.5 - TICK <= due <= 15 + slack(ctx), f"{res}: refresh at {due:.2f}s, want 13.5..15 s"
        assert bg[0]["time"] - t_ob >= due - TICK
        assert all(x["behaviour"] == "http503" for x in bg)
        assert 3 <= len(bg) <= 12, f"{res}: {len(bg)} background attempts in {serve - due:.1f}s"
        gaps = [bg[k + 1]["time"] - bg[k]["time"] for k in range(len(bg) - 1)]
        for k, g in enumerate(gaps):
            assert g <= 2 ** k + slack(ctx), f"{res}: background retry {k + 1} after {g:.2f}s (cap {2 ** k} s)"
        grown += sum(1 for k, g in enumerate(gaps) if k >= 2 and g > 1.2)
        figures["first_retry_after_s"].append(round(due, 2))
        figures["gaps_s"].append([round(g, 2) for g in gaps])
    assert grown >= 1, f"backoff did not grow past 1.2 s in {n} retry series: {figures['gaps_s']}"
    retries = log_events(d.log(), "entra_retry_scheduled")
    assert any(x.get("serving_cached") == "yes" and x.get("waiting_clients") == "no" for x in retries), \
        "no entra_retry_scheduled line for a background retry"
    note(ctx, **figures)
test_outage_serves_cached_tokens.timeout = 60


# ---- refresh ahead -----------------------------------------------------------------------------------

def test_refresh_ahead(ctx):
    """Three scenarios at once: half-life, Entra's refresh_in, and the jitter of 10 refreshes."""
    def half_life():
        """ok-exp20: refreshed at 9..10 s (half-life, up to 10% earlier); clients switch to the new
        token then, never see a gap, and never get the old one again."""
        res = "https://refresh.example.com"
        tenant, d = start(ctx, "ok-exp20")
        t0 = time.time()
        a = get_token(d.port, res)
        assert_fresh(ctx, a, res, t0, time.time())
        tok_a = a.json["access_token"]
        t_ob = daemon_times(d)[res][0][0]
        seen = poll(d.port, res, t_ob + 12)
        recs = calls_for(ctx, tenant, res)
        assert len(recs) == 2, f"{len(recs)} Entra calls in 12 s, want 2 (one refresh)"
        due = refresh_delays(d, res)[0]
        assert 9 - TICK <= due <= 10 + slack(ctx), f"refreshed {due:.2f}s after obtaining, want 9..10 s"
        assert recs[1]["time"] - t_ob >= due - TICK
        tok_b = recs[1]["access_token"]
        switched = None
        for t_start, t_end, r in seen:
            j = assert_fresh(ctx, r, res, t_start, t_end, min_left=5)
            assert j["access_token"] in (tok_a, tok_b), "an unknown token was served"
            if j["access_token"] == tok_b:
                switched = switched or t_start
            else:
                assert switched is None, "the old token was served after the new one"
                assert t_start < t_ob + 15, "the old token was served after its serve-until"
        assert switched is not None, "the refreshed token never reached the client"
        assert switched - recs[1]["time"] <= 0.5 + slack(ctx), \
            f"clients got the new token {switched - recs[1]['time']:.2f}s after the refresh"
        return round(due, 3)

    def refresh_in():
        """ok-ref2 (refresh_in 2 s, 3599 s lifetime): refreshed every 1.8..2 s; clients never see
        refresh_in and get a 3599 s countdown."""
        res = "https://refresh-in.example.com"
        tenant, d = start(ctx, "ok-ref2")
        get_token(d.port, res)
        t_ob = daemon_times(d)[res][0][0]
        seen = poll(d.port, res, t_ob + 5)
        delays = refresh_delays(d, res)
        assert len(delays) >= 2, f"{len(delays)} refreshes in 5 s with refresh_in 2: {delays}"
        for g in delays:
            assert 1.8 - TICK <= g <= 2.0 + slack(ctx), f"refreshed {g:.2f}s after obtaining, want 1.8..2 s"
        recs = calls_for(ctx, tenant, res)
        assert len(recs) >= len(delays) + 1, "a refresh did not reach Entra"
        assert len(recs) <= 5 / 1.8 + 2, f"{len(recs)} Entra calls in 5 s with refresh_in 2"
        gaps = delays
        toks = set()
        for t_start, t_end, r in seen:
            j = assert_fresh(ctx, r, res, t_start, t_end, min_left=3590)
            toks.add(j["access_token"])
        assert toks <= {x["access_token"] for x in recs} and len(toks) >= 2, "clients never saw a refreshed token"
        return [round(g, 3) for g in gaps]

    def jitter():
        """10 resources of ok-exp20 obtained together: each refresh comes 9..10 s after its token
        (never later than half-life, at most 10% earlier), and they do not all come at once."""
        tenant, d = start(ctx, "ok-exp20")
        resources = [f"https://jitter-{i}.example.com" for i in range(10)]
        for res, r in zip(resources, concurrently(10, lambda i: get_token(d.port, resources[i], timeout=30))):
            assert_token_ok(r, resource=res)
        wait_for(lambda: all(len(calls_for(ctx, tenant, res)) >= 2 for res in resources), 12, "10 refreshes")
        at = [calls_for(ctx, tenant, res)[1]["time"] for res in resources]
        # jitter spreads them over about a second, so two may share a millisecond by chance (they did,
        # once, under ASan); without jitter they would all share a few
        distinct = len({round(x, 3) for x in at})
        assert distinct >= len(at) - 2, f"only {distinct} distinct milliseconds among {len(at)} refreshes"
        delays = [refresh_delays(d, res) for res in resources]
        assert all(delays), "a refresh without its token_refresh line"
        delays = [x[0] for x in delays]
        for res, dt in zip(resources, delays):
            assert 9 - TICK <= dt <= 10 + slack(ctx), f"{res}: refreshed {dt:.3f}s after obtaining, want 9..10 s"
        spread = max(delays) - min(delays)
        assert spread >= 0.2, f"refreshes not spread out: delays {sorted(round(x, 3) for x in delays)}"
        return sorted(round(x, 3) for x in delays)

    out = parallel(half_life=half_life, refresh_in=refresh_in, jitter=jitter)
    note(ctx, exp20_refresh_after_s=out["half_life"], ref2_refresh_gaps_s=out["refresh_in"],
         jitter_delays_s=out["jitter"])


def test_idle_entry_dropped(ctx):
    """ok-exp8, fetched once and never again. token_cache.c on_tick refreshes an entry when its
    refresh is due unless now - last_used > lifetime (8 s): the refresh at ~3.6..4 s happens
    (~4 s unused), the one at ~7.2..8 s + latency happens when still <= 8 s after the request (so
    nearly always), the one at ~10.8..12 s is replaced by token_dropped. So 1 or 2 background
    refreshes, every one within 8 s of the last use, the drop more than 8 s after it, then
    silence."""
    res = "https://idle.example.com"
    tenant = ctx.tenant("ok-exp8")
    d = ctx.daemon(tenant)
    t_req = time.time()
    assert_token_ok(get_token(d.port, res), resource=res)
    wait_for(lambda: log_events(d.log(), "token_dropped"), 14, "token_dropped")
    dropped = log_events(d.log(), "token_dropped")
    t_drop = log_ts(dropped[0])
    time.sleep(max(0.0, t_drop + 4.5 - time.time()))      # longer than a refresh period: silence
    recs = calls_for(ctx, tenant, res)
    bg = recs[1:]
    assert 1 <= len(bg) <= 2, f"{len(bg)} background refreshes of an unused entry, want 1 or 2 " \
                              f"(at {[round(x['time'] - t_req, 2) for x in bg]} s)"
    due = refresh_delays(d, res)
    assert due and 3.6 - TICK <= due[0] <= 4.0 + slack(ctx), f"first refresh {due} s after obtaining, want 3.6..4"
    for x in bg:
        assert x["time"] - t_req <= 8.0 + slack(ctx), \
            f"refreshed {x['time'] - t_req:.2f}s after the last use (lifetime 8 s)"
    assert len(dropped) == 1 and dropped[0].get("reason") == "unused", dropped
    assert t_drop - t_req >= 8.0 - 0.01, f"dropped {t_drop - t_req:.2f}s after the last use, before a lifetime"
    assert t_drop - t_req <= 12.0 + 2 * slack(ctx), f"dropped only {t_drop - t_req:.2f}s after the last use"
    assert all(x["time"] < t_drop for x in recs), "Entra was called after the entry was dropped"
    # asking again starts from scratch
    assert_token_ok(get_token(d.port, res), resource=res)
    assert len(calls_for(ctx, tenant, res)) == len(recs) + 1
    note(ctx, background_refreshes_s=[round(x["time"] - t_req, 2) for x in bg], dropped_after_s=round(t_drop - t_req, 2))


# ---- at most 8 exchanges at once -------------------------------------------------------------------

def test_exchange_concurrency_cap(ctx):
    tenant = ctx.tenant("slow-1")
    d = ctx.daemon(tenant, extra=["--entra-timeout", "30"])   # three rounds of 8 must fit, even under valgrind
    resources = [f"https://cap-{i}.example.com" for i in range(20)]
    t0 = time.time()
    rs = concurrently(20, lambda i: get_token(d.port, resources[i], timeout=30))
    took = time.time() - t0
    for res, r in zip(resources, rs):
        assert not isinstance(r, Exception), f"{res}: {r!r}"
        assert_token_ok(r, resource=res)
    assert ctx.fake.calls(tenant) == 20, f"{ctx.fake.calls(tenant)} Entra calls for 20 resources"
    peak = ctx.fake.max_inflight(tenant)
    assert peak <= 8, f"the fake saw {peak} exchanges at once, the cap is 8"
    if ctx.scale < 5:   # under valgrind the handshakes may not overlap enough to fill every slot
        assert peak == 8, f"the fake saw at most {peak} exchanges at once; 20 were waiting for 8 slots"
        assert took >= 3 - 0.2, f"20 one-second exchanges through 8 slots took only {took:.2f}s"
    assert took <= 3 + 4 * slack(ctx), f"20 one-second exchanges through 8 slots took {took:.2f}s"
    note(ctx, peak_inflight=peak, took_s=round(took, 2))


# ---- graceful shutdown -------------------------------------------------------------------------------

def needs_shutdown_grace(ctx):
    rc, out, _ = ctx.run(["--help"])
    assert rc == 0 and "--shutdown-grace" in out, "imdsd --help does not list --shutdown-grace"


def sigterm(ctx, d, timeout):
    """Sends SIGTERM and waits for the exit; returns (status, seconds). Takes the stop over from
    Ctx.finish (sanitizer and valgrind output are checked here)."""
    d.stopped = True
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    try:
        rc = d.proc.wait(timeout * ctx.scale)
    except subprocess.TimeoutExpired:
        d.kill()
        raise AssertionError(f"imdsd did not exit within {timeout * ctx.scale:.0f}s of SIGTERM")
    took = time.monotonic() - t0
    d.logf.close()
    check_tool_output(d.log(), d.vg_log())
    return rc, took


def in_flight(ctx, d, tenant):
    """A token request in a thread, once Entra has it; returns (thread, box with r/took/error)."""
    box = {}

    def client():
        try:
            box["r"] = get_token(d.port, timeout=40)
        except Exception as e:  # noqa: BLE001 - asserted by the caller
            box["error"] = e
        box["t"] = time.monotonic()
    th = threading.Thread(target=client, daemon=True)
    th.start()
    wait_for(lambda: ctx.fake.calls(tenant) == 1, 5, "the exchange to start")
    time.sleep(0.2)
    return th, box


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def test_sigterm_lets_request_in_flight_finish(ctx):
    needs_shutdown_grace(ctx)
    tenant = ctx.tenant("slow-2")
    d = ctx.daemon(tenant, extra=["--shutdown-grace", "5"])
    th, box = in_flight(ctx, d, tenant)
    t_sig = time.monotonic()
    result = {}

    def stop():
        try:
            result["rc"], result["took"] = sigterm(ctx, d, 10)
        except AssertionError as e:
            result["error"] = e
    stopper = threading.Thread(target=stop, daemon=True)
    stopper.start()
    wait_for(lambda: refused(d.port), 1, "the listener to close after SIGTERM")
    th.join(10 * ctx.scale)
    stopper.join(15 * ctx.scale)
    assert "error" not in box, f"the request in flight failed: {box.get('error')!r}"
    assert_token_ok(box["r"])
    assert box["t"] - t_sig <= 2 + slack(ctx), f"answered {box['t'] - t_sig:.2f}s after SIGTERM"
    if "error" in result:
        raise result["error"]
    assert result.get("rc") == 0, f"exit status {result.get('rc')} after SIGTERM"
    assert result["took"] < 4 * ctx.scale, f"exited {result['took']:.2f}s after SIGTERM (grace 5 s, work done at ~2 s)"
    assert ctx.fake.calls(tenant) == 1
    note(ctx, answered_after_sigterm_s=round(box["t"] - t_sig, 2), exit_after_s=round(result["took"], 2))


def test_sigterm_grace_over_fails_request_with_503(ctx):
    needs_shutdown_grace(ctx)
    tenant = ctx.tenant("slow-30")
    d = ctx.daemon(tenant, extra=["--shutdown-grace", "1"])
    th, box = in_flight(ctx, d, tenant)
    t_sig = time.monotonic()
    rc, took = sigterm(ctx, d, 10)
    th.join(5 * ctx.scale)
    assert rc == 0, f"exit status {rc} after SIGTERM"
    assert "error" not in box, f"the request in flight got no answer: {box.get('error')!r}"
    assert_json_error(box["r"], 503, "service_unavailable")
    after = box["t"] - t_sig
    assert 0.9 <= after <= 1 + 3 * slack(ctx), f"503 {after:.2f}s after SIGTERM, grace is 1 s"
    assert took <= 1 + 4 * slack(ctx), f"exited {took:.2f}s after SIGTERM with --shutdown-grace 1"
    note(ctx, answered_after_sigterm_s=round(after, 2), exit_after_s=round(took, 2))

