"""Soak with faults: imdsd under steady load for SOAK_SECONDS (60 in make check, 600 in make soak)
while the stand-in Entra fails at random and the kubelet rotates the service-account token.

  * Entra (fake_entra.py chaos mode, seeded; the seed is printed, SOAK_SEED=N repeats the picks):
    SOAK_FAULT_SHARE (0.2) of its answers are one of http500, http429 (Retry-After 7), reset,
    truncated, slow-2, garbage; the others, and slow-2 after its wait, issue 20 s access tokens,
    so every key is refreshed every 9..10 s (half-life, up to 10% earlier).
  * the projected token is rotated every 7 s in the kubelet's layout (harness.KubeletToken), each
    time a new JWT (own jti, iat, signature);
  * 4 raw HTTP clients (3 keep-alive, 1 with a new connection per request), SOAK_RATE (20)
    requests/s each, over 50 resources x 2 client ids (--allow-client-id), plus the real
    azure-identity ManagedIdentityCredential (a new process every 15 s, 2 scopes).

Checked on every answer, after the run, against the fake's record of every exchange:
  * a 200 is the IMDS shape for the requested client id and resource, carries a token the fake
    issued to that client id for that scope (whose own claims say so: aud, appid) and that is not
    expired (its exp claim, the fake's record, expires_on); the daemon served it before its
    serve-until (refresh.h: REFRESH_SERVE_MARGIN_MS, a quarter of the lifetime below 60 s, so
    expires_on - 5 s for 20 s tokens; the request started before expires_on - 4 s, as expires_on
    is the exchange's whole second);
  * no error answer for a key while the newest token a client had received for it was still
    servable by more than the lookup slack (0.5 s x the variant's scale): imdsd answers from the
    cache before it looks at throttling or failures (token_cache.c token_cache_get);
  * every exchange presented the newest service-account token: the file's content when the fake
    received the request, or the one before only up to GRACE (1 s x scale) after the rename
    (imdsd reads the file for each exchange; the grace covers connecting and sending);
  * every rotation reached the daemon (token_file_loaded fp=... in its log);
  * file descriptors and (release build) VmRSS are flat: sampled every 2 s; after the warm-up
    (a quarter of the run, 10..60 s) the max of the last third may exceed the max of the first
    third by FD_TOLERANCE descriptors and RSS_TOLERANCE_KIB;
  * the raw clients were not starved: over their time not spent waiting for an exchange (an error
    answer, or a 200 whose token the fake issued after the request began) they kept half their rate;
  * the daemon took every token the fake issued and no other (entra_token token_fp=... in its
    log), imdsd_entra_exchanges_total{outcome="ok"} agrees, nothing was classified permanent, and
    it exits cleanly on SIGTERM (ASan/UBSan reports fail the test).
The summary table is printed (make soak runs pytest with -s) and written to build/soak-<variant>.txt
with the samples. The fault picks and the clients' key orders come from SOAK_SEED.
"""
import base64
import http.client
import json
import os
import random
import re
import sys
import threading
import time

import harness
from harness import CLIENT_ID, JSON_CT, KubeletToken, free_port, log_events, log_ts, make_jwt, request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "compat"))
import sdk_clients as sdk  # noqa: E402

ONLY_VARIANTS = ("plain", "asan")   # valgrind cannot keep up with the load; make soak: plain only
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
RATE = float(os.environ.get("SOAK_RATE", "20"))            # requests/s per raw client thread
FAULT_SHARE = float(os.environ.get("SOAK_FAULT_SHARE", "0.2"))
SEED = int(os.environ.get("SOAK_SEED") or random.SystemRandom().randrange(1, 1 << 31))
FAULTS = ["http500", "http429", "reset", "truncated", "slow-2", "garbage"]
LIFETIME = 20                       # s, the access tokens' expires_in (ok-exp20)
SERVE_MARGIN = LIFETIME / 4         # refresh_serve_until_ms: min(15 s, lifetime / 4)
ROTATE_EVERY = 7.0                  # s
SDK_EVERY = 15.0                    # s
SAMPLE_EVERY = 2.0                  # s
OTHER_ID = "5e6f7a8b-2222-4222-8222-22222222222c"         # the --allow-client-id identity
CLIENT_IDS = [CLIENT_ID, OTHER_ID]
RESOURCES = [f"https://soak-{i}.example" + ("/" if i % 2 == 0 else "") for i in range(50)]
KEYS = [(c, r) for c in CLIENT_IDS for r in RESOURCES]
FD_TOLERANCE = 12                   # Entra connections come and go: up to 8 exchanges at once + 4 pooled idle
RSS_TOLERANCE_KIB = 512             # TLS contexts (2 x 16 KiB buffers each) and the heap's fragmentation


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS:")).split()[1])


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def metric_values(text):
    """{(name, frozenset(labels)): value} of a Prometheus text page."""
    out = {}
    for line in text.splitlines():
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        if m and not line.startswith("#"):
            labels = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric(values, name, **labels):
    return values.get((name, frozenset(labels.items())), 0.0)


def claims_of(jwt):
    try:
        part = jwt.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (IndexError, ValueError):
        return {}


def token_path(client_id, resource, explicit):
    return harness.token_url(resource, client_id if explicit else None)


class Run:
    """What the soak's threads collect; each list is appended by one kind of thread."""

    def __init__(self):
        self.stop = threading.Event()
        self.answers = []        # (thread, key index, t_start, t_end, status, json or None, error text)
        self.samples = []        # (t, rss KiB, fds)
        self.sdk = []            # (t_start, t_end, client id, results or exception text)
        self.errors = []         # unexpected exceptions in helper threads


def raw_client(run, port, k, seed, keep_alive):
    """One raw HTTP client: RATE requests/s over every key in a shuffled cycle; the default client
    id is named in the query on every other pass, left out otherwise."""
    rng = random.Random(seed * 100 + k)
    order = list(range(len(KEYS)))
    conn, n, passes = None, 0, 0
    period = 1.0 / RATE
    next_at = time.monotonic()
    while not run.stop.is_set():
        if n % len(order) == 0:
            rng.shuffle(order)
            passes += 1
        ki = order[n % len(order)]
        n += 1
        client_id, resource = KEYS[ki]
        explicit = client_id != CLIENT_ID or passes % 2 == 0
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30 * harness.SCALE)
        t0 = time.time()
        try:
            conn.request("GET", token_path(client_id, resource, explicit), headers={"Metadata": "true"})
            r = conn.getresponse()
            body = r.read()
            t1 = time.time()
            try:
                j = json.loads(body)
            except ValueError:
                j = None
            run.answers.append((k, ki, t0, t1, r.status, j, None if r.getheader("Content-Type") == JSON_CT
                                else f"Content-Type {r.getheader('Content-Type')!r}",
                                r.getheader("Retry-After")))
            if not keep_alive or r.will_close:
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as e:
            run.answers.append((k, ki, t0, time.time(), None, None, repr(e), None))
            conn.close()
            conn = None
        next_at += period
        delay = next_at - time.monotonic()
        if delay > 0:
            run.stop.wait(delay)
        else:
            next_at = time.monotonic()    # fell behind (a request waited for Entra): no burst to catch up
    if conn is not None:
        conn.close()


def rotator(run, tok):
    while not run.stop.wait(ROTATE_EVERY):
        tok.rotate(make_jwt())


def sampler(run, pid):
    while True:
        try:
            run.samples.append((time.time(), rss_kib(pid), fd_count(pid)))
        except OSError as e:
            run.errors.append(f"sampler: {e!r}")
            return
        if run.stop.wait(SAMPLE_EVERY):
            return


def sdk_client(run, ctx, port, seed):
    """azure-identity's ManagedIdentityCredential in a new process every SDK_EVERY s, 2 scopes of
    resources without a trailing slash (the SDK sends the scope minus /.default), the two ids in turn."""
    rng = random.Random(seed * 100 + 99)
    env = sdk.imds_env(ctx, port)
    i, t_first = 0, time.monotonic() + 5.0
    while not run.stop.wait(max(0.0, t_first + i * SDK_EVERY - time.monotonic())):   # a fixed schedule
        client_id = CLIENT_IDS[i % 2]
        scopes = [RESOURCES[j] + "/.default" for j in rng.sample(range(1, len(RESOURCES), 2), 2)]
        options = {"client_id": client_id} if client_id != CLIENT_ID else {}
        t0 = time.time()
        try:
            res = sdk.run_py(ctx, "ManagedIdentityCredential", scopes, env, options=options,
                             timeout=60 * harness.SCALE)
        except AssertionError as e:
            res = str(e)
        run.sdk.append((t0, time.time(), client_id, res))
        i += 1


def thirds(samples, t_from):
    after = [s for s in samples if s[0] >= t_from]
    n = len(after) // 3
    return (after[:n], after[-n:]) if n else ([], [])


def test_soak(ctx):
    variant = "asan" if harness.LABEL == "asan" else "plain"
    slack = 0.5 * ctx.scale          # our send -> the daemon's cache lookup, on 2 shared cores
    grace = 1.0 * ctx.scale          # file read -> the request at Entra (connect, TLS, send)
    warm = min(60.0, max(10.0, SECONDS / 4))
    print(f"\n# soak ({variant}): {SECONDS:.0f} s, seed {SEED} (SOAK_SEED={SEED} repeats the fault picks), "
          f"{FAULT_SHARE:.0%} faults {FAULTS}, {len(KEYS)} keys, {RATE:g} requests/s x 4 clients", flush=True)

    tok = KubeletToken(os.path.join(ctx.tmp, "sa-volume"))
    tenant = ctx.tenant(f"ok-exp{LIFETIME}")
    hp = free_port()
    d = ctx.daemon(tenant, token=tok, log_level="info",
                   extra=["--allow-client-id", OTHER_ID, "--health-listen", f"127.0.0.1:{hp}"])
    # the fake does not compare the assertion with the file: Entra accepts any valid projected token,
    # the previous one too; which one was presented is checked below from the fake's records
    ctx.fake.control(tenant, token_file="")
    ctx.fake._call("POST", "/_control", {"tenant": tenant, "chaos": {
        "p": FAULT_SHARE, "kinds": FAULTS, "ok": f"ok-exp{LIFETIME}", "seed": SEED}})

    run = Run()
    t_begin = time.time()
    fd_start, rss_start = fd_count(d.pid), rss_kib(d.pid)
    threads = [threading.Thread(target=raw_client, args=(run, d.port, k, SEED, k < 3), daemon=True)
               for k in range(4)]
    threads += [threading.Thread(target=rotator, args=(run, tok), daemon=True),
                threading.Thread(target=sampler, args=(run, d.pid), daemon=True),
                threading.Thread(target=sdk_client, args=(run, ctx, d.port, SEED), daemon=True)]
    try:
        for t in threads:
            t.start()
        run.stop.wait(SECONDS)
    finally:
        run.stop.set()
        for t in threads:
            t.join(90 * ctx.scale)
    t_stop = time.time()
    assert not any(t.is_alive() for t in threads), "a soak thread did not stop"
    assert d.alive(), "imdsd died during the soak"
    # the last rotation must have had its chance to be seen (an inotify event, a 10 ms debounce)
    time.sleep(max(0.0, tok.rotations[-1]["t_renamed"] + 1.0 * ctx.scale - time.time()))
    fd_end, rss_end = fd_count(d.pid), rss_kib(d.pid)
    # the daemon keeps refreshing: read in this order, the metrics count no more than its log shows,
    # and the log no token the fake's records do not hold (the fake records before it answers)
    t_scrape = time.time()
    m = metric_values(request(hp, "/metrics").body.decode())
    log = d.log()
    stats = ctx.fake.stats()
    recs = sorted(ctx.fake.records(tenant), key=lambda x: x["time"])
    wall = t_stop - t_begin

    # ---- every answer -------------------------------------------------------------------------
    issued = {x["access_token"]: x for x in recs if x.get("access_token")}
    problems = []

    def bad(what):
        if len(problems) < 2000:
            problems.append(what)

    by_status, conn_errors = {}, 0
    got_tokens = {}      # key index -> [(t_seen, expires_on)] of the tokens clients got
    late_errors, errors_ok = [], 0
    entra_wait, cached_lat = 0.0, []   # client time spent on answers that waited for an exchange; the others' times
    for k, ki, t0, t1, status, j, ctype_problem, retry_after in sorted(run.answers, key=lambda a: a[2]):
        client_id, resource = KEYS[ki]
        by_status[status] = by_status.get(status, 0) + 1
        tok_ = j.get("access_token") if status == 200 and isinstance(j, dict) else None
        rec = issued.get(tok_) if isinstance(tok_, str) else None
        if status != 200 or rec is None or rec["time"] >= t0:    # an error, or a token exchanged meanwhile
            entra_wait += t1 - t0
        else:
            cached_lat.append(t1 - t0)
        where = f"[{client_id[:8]} {resource}] at +{t0 - t_begin:.2f}s"
        if status is None:
            conn_errors += 1
            bad(f"{where}: no answer: {ctype_problem}")
            continue
        if ctype_problem:
            bad(f"{where}: {status} with {ctype_problem}")
        if status == 200:
            if not isinstance(j, dict) or sorted(j) != harness.IMDS_FIELDS:
                bad(f"{where}: 200 body {str(j)[:200]}")
                continue
            if j["resource"] != resource or j["client_id"] != client_id or j["token_type"] != "Bearer":
                bad(f"{where}: answered for [{j['client_id']} {j['resource']}] {j['token_type']}")
            exp_on, left = int(j["expires_on"]), int(j["expires_in"])
            claims = claims_of(j["access_token"])
            if rec is None:
                bad(f"{where}: a token the fake never issued to this tenant")
                continue
            if rec["client_id"] != client_id or rec["scope"] != resource + "/.default":
                bad(f"{where}: the token was issued to {rec['client_id']} for {rec['scope']}")
            if claims.get("aud") != resource or claims.get("appid") != client_id:
                bad(f"{where}: the token's claims say aud={claims.get('aud')} appid={claims.get('appid')}")
            if not claims.get("exp", 0) > t1 or not rec["time"] + rec["expires_in"] > t1:
                bad(f"{where}: an expired token (exp {claims.get('exp')}, issued at +{rec['time'] - t_begin:.2f}s)")
            if not exp_on > t1:
                bad(f"{where}: expires_on {exp_on} is not in the future")
            if not t0 < exp_on - (SERVE_MARGIN - 1):
                bad(f"{where}: served {exp_on - t0:.2f}s before expires_on, after its serve-until "
                    f"({SERVE_MARGIN:g} s before expiry)")
            if not exp_on - t1 - 1.5 <= left <= exp_on - t0 + 1.5:
                bad(f"{where}: expires_in {left} does not count down to expires_on {exp_on}")
            if int(j["expires_on"]) - int(j["not_before"]) != LIFETIME or not rec["time"] >= int(j["not_before"]):
                bad(f"{where}: not_before {j['not_before']} / expires_on {exp_on} do not fit the exchange "
                    f"at {rec['time']:.2f} with expires_in {LIFETIME}")
            got_tokens.setdefault(ki, []).append((t1, exp_on))
        else:
            if not isinstance(j, dict) or not isinstance(j.get("error"), str) or "access_token" in j:
                bad(f"{where}: {status} body {str(j)[:200]}")
            if status not in (429, 503):
                bad(f"{where}: status {status} {str(j)[:200]}")
            if status == 429 and not (retry_after or "").isdigit():
                bad(f"{where}: 429 without a Retry-After")
            # the newest token a client had received for this key before this request was sent
            t_seen, exp_on = max(((ts, e) for ts, e in got_tokens.get(ki, []) if ts <= t0),
                                 key=lambda te: te[1], default=(0, 0))
            servable_until = exp_on - SERVE_MARGIN        # at least; the exchange's fraction of a second more
            if t0 + slack < servable_until:
                late_errors.append(f"{where}: {status} {j.get('error') if isinstance(j, dict) else j} while the "
                                   f"token a client got at +{t_seen - t_begin:.2f}s was servable for "
                                   f"{servable_until - t0:.2f}s more")
            else:
                errors_ok += 1

    # ---- the SDK's tokens -----------------------------------------------------------------------
    sdk_tokens, sdk_failed = 0, []
    for t0, t1, client_id, res in run.sdk:
        if isinstance(res, str):
            sdk_failed.append(f"+{t0 - t_begin:.1f}s {client_id[:8]}: {res[:300]}")
            continue
        try:
            got = sdk.check_tokens(ctx, tenant, res, client_id)
        except AssertionError as e:
            sdk_failed.append(f"+{t0 - t_begin:.1f}s {client_id[:8]}: {e}")
            continue
        for scope, rec in got.items():
            if not rec["time"] + rec["expires_in"] > t1:
                sdk_failed.append(f"+{t0 - t_begin:.1f}s {client_id[:8]} {scope}: an expired token")
        sdk_tokens += len(got)

    # ---- every exchange presented the newest service-account token ------------------------------
    rot = tok.rotations       # gen 1 is the initial token
    gen_of = {r["sha256"]: r["gen"] for r in rot}
    stale, unknown, previous, lateness = [], [], 0, []
    for x in recs:
        g = gen_of.get(x["assertion_sha256"])
        if g is None:
            unknown.append(f"+{x['time'] - t_begin:.2f}s {x['scope']}: jti {x.get('assertion_jti')}")
            continue
        newest = max((r["gen"] for r in rot if r["t_before"] <= x["time"]), default=1)
        if g >= newest:
            continue
        after = x["time"] - rot[g]["t_renamed"]      # rot[g] is generation g + 1
        if g == newest - 1 and after <= grace:
            previous += 1
            lateness.append(after)
        else:
            stale.append(f"+{x['time'] - t_begin:.2f}s {x['scope']}: generation {g} (jti {x.get('assertion_jti')}), "
                         f"{after:.2f}s after generation {g + 1} was renamed into place (newest {newest})")

    # ---- rotations seen by the daemon -----------------------------------------------------------
    loaded = {}
    for e in log_events(log, "token_file_loaded"):
        loaded.setdefault(e.get("fp"), log_ts(e))
    unseen = [r["gen"] for r in rot if r["fp"] not in loaded]
    seen_after = [loaded[r["fp"]] - r["t_renamed"] for r in rot[1:] if r["fp"] in loaded]
    refreshes = log_events(log, "token_refresh")

    # ---- the daemon took every token the fake issued, and no other -----------------------------
    got_fps = {e.get("token_fp") for e in log_events(log, "entra_token")}
    issued_fps = {harness.fingerprint(t) for t in issued}
    # a token recorded this long before the scrape was answered before it (slow-2 sleeps after the record)
    settled = [t for t, x in issued.items() if x["time"] < t_scrape - 5]
    not_taken = [harness.fingerprint(t) for t in settled if harness.fingerprint(t) not in got_fps]
    not_issued = sorted(got_fps - issued_fps)

    # ---- descriptors and memory -------------------------------------------------------------------
    first, last = thirds(run.samples, t_begin + warm)
    measure_rss = variant == "plain"          # ASan keeps freed memory in quarantine
    flat = []
    if first and last:
        fd_first, fd_last = max(s[2] for s in first), max(s[2] for s in last)
        rss_first, rss_last = max(s[1] for s in first), max(s[1] for s in last)
        if fd_last > fd_first + FD_TOLERANCE:
            flat.append(f"descriptors grew: max {fd_first} in the first third after warm-up, {fd_last} in the last")
        if measure_rss and rss_last > rss_first + RSS_TOLERANCE_KIB:
            flat.append(f"VmRSS grew: max {rss_first} KiB in the first third after warm-up, {rss_last} KiB in the last")
    else:
        fd_first = fd_last = rss_first = rss_last = None
        flat.append(f"only {len(run.samples)} samples")
    peak = max([s[1] for s in run.samples] + [rss_start, rss_end])

    # ---- the summary --------------------------------------------------------------------------------
    behaviours = stats.get("behaviours", {}).get(tenant, {})
    rec_status = {}
    for x in recs:
        rec_status[str(x["status"])] = rec_status.get(str(x["status"]), 0) + 1
    outcomes = {o: int(metric(m, "imdsd_entra_exchanges_total", outcome=o))
                for o in ("ok", "transient", "throttled", "permanent")}
    codes = {}
    for (name, labels), v in m.items():
        labels = dict(labels)
        if name == "imdsd_http_requests_total" and labels.get("endpoint") == "token":
            codes[labels.get("code")] = int(v)
    triggers = {}
    for e in refreshes:
        triggers[e.get("trigger")] = triggers.get(e.get("trigger"), 0) + 1
    nreq = len(run.answers)
    free = 4 * wall - entra_wait        # client-seconds not spent waiting for Entra
    cached_lat.sort()
    cached_p99 = cached_lat[int(len(cached_lat) * 0.99)] * 1000 if cached_lat else 0

    def fmt(dct):
        return ", ".join(f"{k} {v}" for k, v in sorted(dct.items(), key=lambda kv: str(kv[0])))
    rows = [
        ("variant, seed", f"{variant} ({harness.BINARY}), SOAK_SEED={SEED}"),
        ("duration", f"{wall:.1f} s of load ({SECONDS:g} asked), warm-up {warm:.0f} s"),
        ("requests (raw clients)", f"{nreq} = {nreq / wall:.1f}/s; 3 keep-alive + 1 new connection each; "
                                   f"{len(KEYS)} keys"),
        ("client time", f"{entra_wait:.1f} of {4 * wall:.0f} client-s waiting for Entra (no servable token); "
                        f"the other {free:.1f} gave {nreq / max(free, 1e-9):.1f} requests per "
                        f"client-s (asked {RATE:g}); cached answers p99 {cached_p99:.1f} ms"),
        ("answers by status", fmt({("no answer" if s is None else s): n for s, n in by_status.items()})),
        ("errors while servable", f"{len(late_errors)} (other errors {errors_ok}: no servable token then)"),
        ("SDK (azure-identity)", f"{len(run.sdk)} processes, {sdk_tokens} tokens, {len(sdk_failed)} failed"),
        ("Entra calls (fake)", f"{len(recs)}: {fmt(behaviours)}"),
        ("Entra answers (fake)", fmt(rec_status)),
        ("exchanges (metrics)", f"{fmt(outcomes)}; retries {int(metric(m, 'imdsd_entra_retries_total'))}"),
        ("refreshes (log)", f"{len(refreshes)} ({fmt(triggers)})"),
        ("token answers (metrics)", fmt(codes)),
        ("rotations", f"{len(rot) - 1} done, {len(rot) - 1 - len([g for g in unseen if g > 1])} seen by the "
                      f"daemon (token_file_loads_total {int(metric(m, 'imdsd_token_file_loads_total'))}), "
                      f"seen after max {max(seen_after, default=0) * 1000:.0f} ms"),
        ("previous SA token used", f"{previous} exchanges, at most {max(lateness, default=0) * 1000:.0f} ms after "
                                   f"the rename (grace {grace * 1000:.0f} ms); stale {len(stale)}, unknown {len(unknown)}"),
        ("VmRSS KiB", f"start {rss_start}, peak {peak}, end {rss_end}; max first/last third {rss_first}/{rss_last} "
                      f"(tolerance {RSS_TOLERANCE_KIB}{'' if measure_rss else ', not asserted under ASan'})"),
        ("descriptors", f"start {fd_start}, end {fd_end}; max first/last third {fd_first}/{fd_last} "
                        f"(tolerance {FD_TOLERANCE})"),
    ]
    width = max(len(a) for a, _ in rows)
    table = "\n".join([f"soak summary ({variant}, {SECONDS:g} s)"] + [f"  {a:<{width}}  {b}" for a, b in rows])
    print(table, flush=True)
    os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
    with open(os.path.join(ROOT, "build", f"soak-{variant}.txt"), "w") as f:
        f.write(table + "\n")
        f.write("samples (s since start, VmRSS KiB, fds): " +
                " ".join(f"{t - t_begin:.0f}/{r}/{n}" for t, r, n in run.samples) + "\n")
    with open(os.path.join(ctx.tmp, "soak-answers.jsonl"), "w") as f:   # pytest --keep
        for a in run.answers:
            f.write(json.dumps(a) + "\n")

    # ---- the verdict --------------------------------------------------------------------------------
    assert not run.errors, run.errors
    # a client waiting for an exchange sends nothing (the faults make those waits long, 14 s seen);
    # the rest of its time it keeps RATE unless imdsd or the machine starves it
    assert nreq >= RATE * free * 0.5, \
        f"only {nreq} requests in the {free:.0f} client-s not spent waiting for Entra: the clients were starved"
    assert not problems, f"{len(problems)} bad answers, e.g.:\n  " + "\n  ".join(problems[:10])
    assert not late_errors, f"{len(late_errors)} error answers while a servable token was cached:\n  " + \
        "\n  ".join(late_errors[:10])
    assert by_status.get(200, 0) >= 0.9 * nreq, f"only {by_status.get(200, 0)} of {nreq} answers were 200"
    assert not sdk_failed, "azure-identity: " + "; ".join(sdk_failed[:5])
    assert len(run.sdk) >= int((SECONDS - 5) / SDK_EVERY) - 1, f"only {len(run.sdk)} SDK runs"
    assert not unknown, f"{len(unknown)} exchanges presented a token never in the file: {unknown[:3]}"
    assert not stale, f"{len(stale)} exchanges presented an old service-account token:\n  " + "\n  ".join(stale[:10])
    assert len(rot) - 1 >= int(SECONDS / ROTATE_EVERY) - 1, f"only {len(rot) - 1} rotations"
    assert not unseen, f"the daemon never loaded generation(s) {unseen} of the token file"
    assert all(b in behaviours for b in FAULTS) or SECONDS < 120, f"not every fault was injected: {behaviours}"
    assert not not_issued, f"the daemon logged tokens the fake never issued: {not_issued[:5]}"
    assert not not_taken, f"{len(not_taken)} tokens the fake issued never reached the daemon: {not_taken[:5]}"
    assert len(settled) <= outcomes["ok"] <= len(issued), \
        f"the daemon counted {outcomes['ok']} successful exchanges, the fake issued {len(settled)} tokens " \
        f"more than 5 s before the scrape and {len(issued)} in all"
    assert outcomes["permanent"] == 0, f"{outcomes['permanent']} exchanges classified permanent"
    assert not flat, "; ".join(flat)


test_soak.timeout = SECONDS + 150
