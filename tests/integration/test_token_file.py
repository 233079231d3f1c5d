"""The projected token file's life cycle (issue 4): kubelet rotations in both AZWI layouts while
requests are in flight, plain files, every bad-file state, start-up before the file exists,
AADSTS700024, cached tokens across a rotation, SIGHUP, readiness, and the log.

Contract under test: imdsd watches the directory that holds ..data (plus a periodic re-read), reads
the file afresh for every exchange, classifies it (ok missing unreadable empty too_large malformed
expired not_yet_valid), logs each state change once (event=token_file_state) and each new token
(event=token_file_loaded fp=...), reports it on /readyz within a second, answers token requests with
503 + Retry-After (and no Entra call) while it is unusable, and re-reads + retries once on
AADSTS700024.

Clocks: the fake stamps each call with time.time() after it has read the form, so its "time" is
later than the moment the daemon read the token file. Every "must present the new token" rule here is
therefore keyed on the time our client *sent* the request (which is before the daemon could read
anything for it) against the time the ..data rename had *returned*: both are CLOCK_REALTIME on this
host, in this process.
"""
import hashlib
import os
import re
import signal
import threading
import time

import harness
from harness import (JSON_CT, RESOURCE, KubeletToken, assert_json_error, assert_token_ok, fingerprint, get_token,
                     log_events, log_ts, make_jwt_with, request, wait_for)

REACT = 1.0      # seconds: the contract's bound for the watch and /readyz to follow a change
_DAEMONS = []    # every daemon started here, for the final "token never logged" check
_SA = []         # every service-account token content written here


# ---- helpers ------------------------------------------------------------------------------------

def new_jwt(**kw):
    """make_jwt_with, remembered for the log check. Returns (jwt, claims)."""
    j, c = make_jwt_with(**kw)
    _SA.append(j)
    return j, c


def kubelet(ctx, nested=False, content=None, create=True):
    """A KubeletToken under this test's temp dir; content defaults to a fresh good token."""
    ctx.n += 1
    tok = KubeletToken(os.path.join(ctx.tmp, f"vol-{ctx.n}"), nested=nested, create=False)
    if create:
        tok.rotate(content if content is not None else new_jwt()[0])
    return tok


class PlainToken:
    """A token in an ordinary file, changed the ways people change files outside Kubernetes."""

    def __init__(self, path, content=None):
        self.path, self.content = path, None
        if content is not None:
            self.create(content)

    def create(self, content):
        """Plain open(O_CREAT) + write + close, creating missing directories first."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w") as f:
            f.write(content)
        self.content = content

    def replace_by_rename(self, content):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(content)
        os.rename(tmp, self.path)
        self.content = content

    def rewrite_in_place(self, content):
        fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)   # same inode: truncate, then write
        try:
            os.write(fd, content.encode())
        finally:
            os.close(fd)
        self.content = content

    def delete(self):
        os.unlink(self.path)


def start(ctx, tok, tenant=None, **kw):
    """A daemon that has read its token file once (unless wait=False): until that first read (on
    libuv's thread pool) is back, /readyz truthfully says state "unknown", "token file not read yet"."""
    d = ctx.daemon(tenant or ctx.tenant("ok"), token=tok, **kw)
    _DAEMONS.append((ctx.fake, d))
    if kw.get("wait", True):
        harness.wait_for(lambda: request(d.port, "/readyz", timeout=5).json["token_file"]["state"] != "unknown",
                         5, "the daemon's first read of its token file")
    return d


def readyz(d):
    r = request(d.port, "/readyz", timeout=5)
    assert r.headers.get("content-type") == JSON_CT, f"/readyz Content-Type: {r!r}"
    assert isinstance(r.json, dict), f"/readyz body is not a JSON object: {r!r}"
    return r


def token_file_of(r):
    t = r.json.get("token_file")
    assert isinstance(t, dict), f"/readyz has no token_file object: {r!r}"
    return t


def ready_with(claims):
    """/readyz predicate: 200 and reporting exactly this token (subject and expiry)."""
    def pred(r):
        t = r.json.get("token_file") if r.status == 200 else None
        return isinstance(t, dict) and t.get("state") == "ok" and t.get("subject") == claims["sub"] \
            and t.get("expires_on") == str(claims["exp"])
    return pred


def in_state(state):
    def pred(r):
        t = r.json.get("token_file")
        return r.status == 503 and isinstance(t, dict) and t.get("state") == state
    return pred


def wait_readyz(d, pred, what, t0, timeout=REACT, interval=0.01):
    """Polls /readyz until pred holds; fails if that takes more than timeout (scaled) from t0.
    Returns (response, seconds from t0)."""
    deadline = t0 + timeout * harness.SCALE
    while True:
        r = readyz(d)
        if pred(r):
            return r, time.time() - t0
        if time.time() > deadline:
            raise AssertionError(f"/readyz did not show {what} within {timeout * harness.SCALE:.1f}s "
                                 f"of the change; it says {r!r}")
        time.sleep(interval)


def assert_ready(r, path, claims):
    """The full 200 /readyz shape for this token."""
    assert r.status == 200, f"/readyz {r!r}"
    assert r.json.get("status") == "ready", r.json
    t = token_file_of(r)
    assert t.get("path") == path, f"token_file.path {t.get('path')!r}, want {path!r}"
    assert t.get("state") == "ok", t
    assert t.get("subject") == claims["sub"], f"subject {t.get('subject')!r}, want {claims['sub']!r}"
    assert t.get("issuer") == claims["iss"], f"issuer {t.get('issuer')!r}, want {claims['iss']!r}"
    aud = claims["aud"]
    assert t.get("audience") in (aud, aud[0] if isinstance(aud, list) else aud), f"audience {t.get('audience')!r}"
    for k in ("expires_on", "expires_in"):
        assert isinstance(t.get(k), str) and re.fullmatch(r"[0-9]+", t[k]), f"token_file.{k} = {t.get(k)!r}"
    assert t["expires_on"] == str(claims["exp"]), f"expires_on {t['expires_on']}, want {claims['exp']}"
    # imdsd counts whole seconds (its clock floored) when it answers, a moment before this reads the clock:
    # up to a second more than the fractional time left here, and the answer's latency on top
    left = claims["exp"] - time.time()
    assert left - 3 <= int(t["expires_in"]) <= left + 2, f"expires_in {t['expires_in']}, ~{left:.0f} left"


def assert_not_ready(r, path, state, reason_re):
    """The 503 /readyz shape for a token in this bad state, with a reason that names the problem."""
    assert r.status == 503, f"/readyz {r!r}"
    assert r.json.get("status") == "not_ready", r.json
    assert r.json.get("error") == "service_unavailable", r.json
    desc = r.json.get("error_description")
    assert isinstance(desc, str) and desc, r.json
    t = token_file_of(r)
    assert t.get("path") == path, f"token_file.path {t.get('path')!r}, want {path!r}"
    assert t.get("state") == state, f"token_file.state {t.get('state')!r}, want {state!r}"
    assert re.search(reason_re, desc, re.I), f"reason {desc!r} does not say /{reason_re}/"
    return desc


def assert_unavailable(r):
    """What a token request gets while the token file is unusable: 503 JSON + integer Retry-After."""
    assert_json_error(r, 503, "service_unavailable")
    ra = r.headers.get("retry-after")
    assert ra is not None, f"no Retry-After on the 503: {r.header_list}"
    assert re.fullmatch(r"[0-9]+", ra) and int(ra) > 0, f"Retry-After {ra!r} is not a positive integer"


def wait_log(d, pred, what, t0, timeout=REACT, interval=0.01, since="the change"):
    """Polls the daemon's log (making no requests) until an event satisfies pred; fails after
    timeout (scaled) from t0. Returns (record, seconds from t0 by the record's ts= if it has one)."""
    deadline = t0 + timeout * harness.SCALE
    while True:
        hits = [e for e in log_events(d.log()) if pred(e)]
        if hits:
            ts = log_ts(hits[0])
            return hits[0], (ts - t0 if ts is not None else time.time() - t0)
        if time.time() > deadline:
            raise AssertionError(f"no log line {what} within {timeout * harness.SCALE:.1f}s of {since} "
                                 f"(no requests were made meanwhile)")
        time.sleep(interval)


def is_loaded(content):
    fp = fingerprint(content)
    return lambda e: e.get("event") == "token_file_loaded" and e.get("fp") == fp


def is_state_event(state):
    return lambda e: e.get("event") == "token_file_state" and e.get("state") == state


def assert_loaded_line(e, content, claims):
    """event=token_file_loaded carries the byte length, fp, sub, iss and exp of the token."""
    n = str(len(content.strip().encode()))
    assert n in e.values(), f"token_file_loaded has no byte length {n}: {e['_line']}"
    assert re.fullmatch(r"[0-9a-f]{12}", e.get("fp", "")), e["_line"]
    assert e.get("sub") == claims["sub"], e["_line"]
    assert e.get("iss") == claims["iss"], e["_line"]
    assert e.get("exp") == str(claims["exp"]), e["_line"]


def follow(d, t0, path, content, claims):
    """After a change at t0 to a good token: the watch loads it (log, within REACT, no requests
    made meanwhile) and /readyz reports it. Returns seconds from t0 to the log line."""
    e, dt = wait_log(d, is_loaded(content), f"event=token_file_loaded fp={fingerprint(content)}", t0)
    assert_loaded_line(e, content, claims)
    r, _ = wait_readyz(d, ready_with(claims), f"the new token (sub={claims['sub']})", t0)
    assert_ready(r, path, claims)
    return dt


def exchanges(ctx, d, resource=None):
    recs = ctx.fake.records(d.tenant)
    return [r for r in recs if resource is None or r["scope"] == resource + "/.default"]


def sha(content):
    return hashlib.sha256(content.strip().encode()).hexdigest()


def assert_exchange_presents(ctx, d, resource, content):
    """A fresh resource: the client gets 200 and every Entra call for it presented content."""
    r = get_token(d.port, resource)
    assert_token_ok(r, resource=resource)
    recs = exchanges(ctx, d, resource)
    assert recs, f"no Entra call for {resource}"
    bad = [x["assertion_sha256"][:12] for x in recs if x["assertion_sha256"] != sha(content)]
    assert not bad, f"exchange(s) for {resource} presented another token than the file's ({bad})"
    return recs


# ---- 1. kubelet rotations with requests in flight -------------------------------------------------

def rotation_in_flight(ctx, nested):
    tok = kubelet(ctx, nested=nested)
    d = start(ctx, tok)
    stop, done = threading.Event(), []

    def client(k):
        i = 0
        while not stop.is_set():
            res = f"https://rot-{k}-{i}.example.com"
            t_send = time.time()
            try:
                st = get_token(d.port, res, timeout=10).status
            except OSError as e:
                st = repr(e)
            done.append((res, t_send, time.time(), st))
            i += 1
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(3)]
    for t in threads:
        t.start()
    def presented(sha256):   # an exchange presented this generation (a loaded machine is slow to)
        return any(r["assertion_sha256"] == sha256 for r in ctx.fake.records(d.tenant))

    for _ in range(10):
        time.sleep(0.2 * harness.SCALE)
        wait_for(lambda: presented(tok.rotations[-1]["sha256"]), 10 * harness.SCALE,
                 f"an exchange presenting generation {len(tok.rotations)}")
        tok.rotate(new_jwt()[0])
    time.sleep(0.2 * harness.SCALE)
    wait_for(lambda: presented(tok.rotations[-1]["sha256"]), 10 * harness.SCALE,
             f"an exchange presenting generation {len(tok.rotations)}")
    stop.set()
    for t in threads:
        t.join(15 * harness.SCALE)

    gen_of = {r["sha256"]: r["gen"] for r in tok.rotations}
    by_scope = {}
    for rec in ctx.fake.records(d.tenant):
        by_scope.setdefault(rec["scope"], []).append(rec)
    stale, unknown, failed, racing, per_gen = [], [], [], 0, {}
    for res, t_send, t_recv, st in done:
        floor = max(r["gen"] for r in tok.rotations if r["t_renamed"] <= t_send)
        overlaps = any(t_send <= r["t_renamed"] and r["t_before"] <= t_recv for r in tok.rotations)
        for rec in by_scope.get(res + "/.default", []):
            g = gen_of.get(rec["assertion_sha256"])
            if g is None:
                unknown.append(res)
            elif g < floor:
                stale.append(f"{res}: sent {t_send - tok.rotations[floor - 1]['t_renamed']:.3f}s after "
                             f"rotation {floor} completed, presented generation {g}")
            else:
                per_gen[g] = per_gen.get(g, 0) + 1
        if st != 200:
            if overlaps:
                racing += 1
            else:
                failed.append(f"{res}: {st}")
        elif not by_scope.get(res + "/.default"):
            failed.append(f"{res}: 200 without an Entra call")
    layout = "nested (v1.6)" if nested else "flat (<= v1.5)"
    print(f"# rotation in flight, {layout}: {len(done)} requests, {sum(per_gen.values())} exchanges over "
          f"{len(tok.rotations) - 1} rotations, {racing} non-200 while a rename raced the request", flush=True)
    assert len(done) >= 30, f"only {len(done)} requests were made"
    assert not unknown, f"{len(unknown)} exchanges presented a token that was never in the file, e.g. {unknown[:2]}"
    assert not stale, f"{len(stale)} exchanges presented a rotated-away token: {stale[:3]}"
    assert not failed, f"{len(failed)} requests failed without racing a rotation: {failed[:3]}"
    missing = [g for g in range(2, len(tok.rotations) + 1) if not per_gen.get(g)]
    assert not missing, f"no exchange presented generation(s) {missing}: the test did not exercise them"
    assert racing <= 3, f"{racing} requests that raced a rename failed (AADSTS700024 re-read + retry missing?)"


def test_rotation_in_flight_flat(ctx):
    rotation_in_flight(ctx, nested=False)


def test_rotation_in_flight_nested(ctx):
    rotation_in_flight(ctx, nested=True)


# ---- 2. how fast a ..data swap is seen ------------------------------------------------------------

def test_swap_latency(ctx):
    """Per layout, 3 swaps each for: the watch alone (log line, no requests), /readyz polled every
    10 ms, and an exchange requested right after the swap. Prints the figures."""
    report = []
    for nested in (False, True):
        tok = kubelet(ctx, nested=nested)
        d = start(ctx, tok)
        first = tok.content
        wait_log(d, is_loaded(first), "token_file_loaded for the start-up token", time.time(), timeout=3,
                 since="start-up")
        watch, ready, exch = [], [], []
        for i in range(3):
            j, c = new_jwt(sub=f"system:serviceaccount:default:watch-{i}", lifetime=3600 + 11 * i)
            tok.rotate(j)
            watch.append(wait_log(d, is_loaded(j), f"token_file_loaded fp={fingerprint(j)}",
                                  tok.rotations[-1]["t_renamed"])[1])
        for i in range(3):
            j, c = new_jwt(sub=f"system:serviceaccount:default:ready-{i}", lifetime=3700 + 11 * i)
            tok.rotate(j)
            r, dt = wait_readyz(d, ready_with(c), f"sub {c['sub']}", tok.rotations[-1]["t_renamed"],
                                interval=0.002)
            assert_ready(r, tok.path, c)
            ready.append(dt)
        for i in range(3):
            j, c = new_jwt(sub=f"system:serviceaccount:default:exch-{i}", lifetime=3800 + 11 * i)
            tok.rotate(j)
            t_sw = tok.rotations[-1]["t_renamed"]
            res = f"https://swap-{int(nested)}-{i}.example.com"
            recs = assert_exchange_presents(ctx, d, res, j)
            exch.append(recs[0]["time"] - t_sw)
        layout = "nested" if nested else "flat"
        ms = lambda xs: "/".join(f"{x * 1000:.1f}" for x in xs)
        report.append(f"# swap latency {layout}: ->token_file_loaded (watch only) {ms(watch)} ms; "
                      f"->/readyz new token {ms(ready)} ms; ->Entra call with new token {ms(exch)} ms")
        worst = max(ready)
        assert worst < REACT * harness.SCALE, f"/readyz took {worst:.3f}s to follow a swap"
    for line in report:
        print(line, flush=True)


# ---- 3. outside Kubernetes: ordinary files --------------------------------------------------------

def plain_daemon(ctx, sub="dir"):
    jwt, claims = new_jwt(sub="system:serviceaccount:default:plain-0")
    pt = PlainToken(os.path.join(ctx.tmp, sub, "token"), jwt)
    d = start(ctx, pt)
    r, _ = wait_readyz(d, ready_with(claims), "the start-up token", time.time(), timeout=3)
    assert_ready(r, pt.path, claims)
    assert_exchange_presents(ctx, d, "https://before.example.com", jwt)
    return pt, d


def plain_change(ctx, how):
    pt, d = plain_daemon(ctx)
    jwt, claims = new_jwt(sub=f"system:serviceaccount:default:{how}", lifetime=4000)
    t0 = time.time()
    getattr(pt, how)(jwt)
    follow(d, t0, pt.path, jwt, claims)
    assert_exchange_presents(ctx, d, "https://after.example.com", jwt)


def test_plain_file_replaced_by_rename(ctx):
    plain_change(ctx, "replace_by_rename")


def test_plain_file_rewritten_in_place(ctx):
    plain_change(ctx, "rewrite_in_place")


def test_plain_file_deleted_and_recreated(ctx):
    pt, d = plain_daemon(ctx)
    calls = ctx.fake.calls(d.tenant)
    t0 = time.time()
    pt.delete()
    wait_log(d, is_state_event("missing"), "event=token_file_state state=missing", t0)
    r, _ = wait_readyz(d, in_state("missing"), "state missing", t0)
    assert_not_ready(r, pt.path, "missing", r"no such file|not exist|missing|not found")
    assert_unavailable(get_token(d.port, "https://gone.example.com"))
    assert ctx.fake.calls(d.tenant) == calls, "Entra was called while the token file was missing"
    jwt, claims = new_jwt(sub="system:serviceaccount:default:recreated", lifetime=4100)
    t0 = time.time()
    pt.create(jwt)
    follow(d, t0, pt.path, jwt, claims)
    assert_exchange_presents(ctx, d, "https://after.example.com", jwt)


def start_under_busy_ancestor(ctx, tok):
    """Starts the daemon when the nearest existing ancestor of the token path is ctx.tmp, the
    directory that also holds the daemon's own stderr log: whatever the daemon watches there, its
    own log writes must not wake it up into logging more (a feedback loop that starves the loop)."""
    d = start(ctx, tok, wait=False)
    try:
        d.wait_healthy(5)
    except AssertionError:
        size = os.path.getsize(d.log_path)
        if size > 1 << 20:
            lines = log_events(open(d.log_path, errors="replace").read(64 << 10))
            common = max({e.get("event") for e in lines}, key=lambda ev: sum(e.get("event") == ev for e in lines))
            d.kill()                          # stop the flood; keep the first 1 MiB as the artefact
            os.truncate(d.log_path, 1 << 20)
            raise AssertionError(f"imdsd did not answer /healthz: its log grew to {size >> 20} MiB, mostly "
                                 f"event={common} - it reacts to writes to its own log file, which is in "
                                 f"the directory it watches for the missing token path (killed by the "
                                 f"test)") from None
        raise
    return d


def assert_log_quiet(d, limit=256 << 10):
    size = os.path.getsize(d.log_path)
    assert size < limit, f"the daemon logged {size >> 10} KiB during a short test (a wake-up loop?)"


def test_plain_directory_created_later(ctx):
    """Neither the file nor its directory (nor the directory's parent) exists at start-up."""
    pt = PlainToken(os.path.join(ctx.tmp, "late", "secrets", "token"))
    d = start_under_busy_ancestor(ctx, pt)
    # /healthz can answer before the first read of the token file is done ("unknown", under valgrind)
    r, _ = wait_readyz(d, lambda r: token_file_of(r).get("state") != "unknown", "the first read", time.time())
    assert_not_ready(r, pt.path, "missing", r"no such file|not exist|missing|not found")
    assert_unavailable(get_token(d.port))
    os.makedirs(os.path.dirname(pt.path))
    time.sleep(0.3)
    assert in_state("missing")(readyz(d)), "directory alone made /readyz change"
    jwt, claims = new_jwt(sub="system:serviceaccount:default:late")
    t0 = time.time()
    pt.create(jwt)
    follow(d, t0, pt.path, jwt, claims)
    assert ctx.fake.calls(d.tenant) == 0, "Entra was called before the token file existed"
    assert_exchange_presents(ctx, d, RESOURCE, jwt)
    assert_log_quiet(d)


# ---- 4. bad token files ---------------------------------------------------------------------------

def bad_file(ctx, state, reason_re, make_bad):
    """Good token -> make_bad(tok) -> the state is reported once, requests get 503 without an Entra
    call for a few seconds -> a good token brings it back."""
    tok = kubelet(ctx)
    d = start(ctx, tok)
    assert_token_ok(get_token(d.port))
    calls = ctx.fake.calls(d.tenant)
    t0 = time.time()
    make_bad(tok)
    e, _ = wait_log(d, is_state_event(state), f"event=token_file_state state={state}", t0)
    assert e.get("path") == tok.path, f"token_file_state path: {e['_line']}"
    assert e.get("reason"), f"token_file_state without a reason: {e['_line']}"
    assert re.search(reason_re, e["reason"], re.I), f"log reason {e['reason']!r} does not say /{reason_re}/"
    r, _ = wait_readyz(d, in_state(state), f"state {state}", t0)
    assert_not_ready(r, tok.path, state, reason_re)
    for i in range(5):      # several requests over a few seconds
        assert_unavailable(get_token(d.port, f"https://bad-{i}.example.com"))
        assert_not_ready(readyz(d), tok.path, state, reason_re)
        time.sleep(0.5)
    assert ctx.fake.calls(d.tenant) == calls, \
        f"Entra was called {ctx.fake.calls(d.tenant) - calls} times while the token file was {state}"
    lines = [x["_line"] for x in log_events(d.log()) if is_state_event(state)(x)]
    assert len(lines) == 1, f"state {state} logged {len(lines)} times, want once: {lines[:3]}"
    jwt, claims = new_jwt(sub="system:serviceaccount:default:recovered")
    t0 = time.time()
    tok.rotate(jwt)
    follow(d, t0, tok.path, jwt, claims)
    assert_exchange_presents(ctx, d, "https://recovered.example.com", jwt)


def test_bad_expired(ctx):
    now = int(time.time())
    bad_file(ctx, "expired", r"expired",
             lambda tok: tok.rotate(new_jwt(exp=now - 600, iat=now - 4200, nbf=now - 4200)[0]))


def test_bad_not_yet_valid(ctx):
    bad_file(ctx, "not_yet_valid", r"not (yet )?valid|nbf|not before|future",
             lambda tok: tok.rotate(new_jwt(nbf=int(time.time()) + 600)[0]))


def test_bad_empty(ctx):
    bad_file(ctx, "empty", r"empty", lambda tok: tok.rotate(""))


def test_bad_whitespace_only(ctx):
    bad_file(ctx, "empty", r"empty", lambda tok: tok.rotate(" \n\t \r\n  \n"))


def test_bad_too_large(ctx):
    head, body, _ = new_jwt()[0].split(".")
    big = f"{head}.{body}.{harness.b64url(os.urandom(54 * 1024))}"    # ~72 KiB, otherwise a fine JWS
    _SA.append(big)
    assert len(big) > 64 * 1024
    bad_file(ctx, "too_large", r"64 ?KiB|65536|too large|larger|exceeds|size", lambda tok: tok.rotate(big))


def test_bad_garbage(ctx):
    junk = "not-a-jws-" + os.urandom(40).hex()
    _SA.append(junk)
    bad_file(ctx, "malformed", r"compact JWS|three|segment|parts|base64", lambda tok: tok.rotate(junk))


def test_bad_payload_not_json(ctx):
    bad_file(ctx, "malformed", r"JSON",
             lambda tok: tok.rotate(new_jwt(payload=b"this is {not json")[0]))


def test_bad_claims_missing_exp(ctx):
    bad_file(ctx, "malformed", r"\bexp\b", lambda tok: tok.rotate(new_jwt(drop=("exp",))[0]))


def test_bad_directory_at_path(ctx):
    bad_file(ctx, "unreadable", r"directory|not a regular file|EISDIR",
             lambda tok: tok.rotate(KubeletToken.DIRECTORY))


def test_bad_missing(ctx):
    bad_file(ctx, "missing", r"no such file|not exist|missing|not found", lambda tok: tok.remove_data())


# ---- 5. start-up before the volume exists ---------------------------------------------------------

def test_startup_before_kubelet_layout(ctx):
    os.mkdir(os.path.join(ctx.tmp, "k8s"))           # an empty parent; the volume root does not exist
    tok = KubeletToken(os.path.join(ctx.tmp, "k8s", "wi"), nested=True, create=False)
    d = start(ctx, tok)
    r = readyz(d)
    assert_not_ready(r, tok.path, "missing", r"no such file|not exist|missing|not found")
    for res in (RESOURCE, "https://vault.azure.net"):
        assert_unavailable(get_token(d.port, res))
    assert ctx.fake.calls(d.tenant) == 0, "Entra was called without a token file"
    missing = [x for x in log_events(d.log()) if is_state_event("missing")(x)]
    assert len(missing) == 1, f"state missing logged {len(missing)} times"
    time.sleep(0.3)
    jwt, claims = new_jwt(sub="system:serviceaccount:default:arrived")
    t0 = time.time()
    tok.rotate(jwt)
    follow(d, t0, tok.path, jwt, claims)
    assert_exchange_presents(ctx, d, RESOURCE, jwt)
    assert d.alive()
    assert_log_quiet(d)


# ---- 6. AADSTS700024: re-read and retry once ------------------------------------------------------

def test_aadsts700024_then_success(ctx):
    tok = kubelet(ctx)
    d = start(ctx, tok)
    ctx.fake.control(d.tenant, script=["aadsts-700024", "ok"])
    r = get_token(d.port)
    recs = exchanges(ctx, d)
    assert len(recs) == 2, f"fake saw {len(recs)} calls, want 2 (AADSTS700024, then one retry)"
    assert [x["status"] for x in recs] == [401, 200], [x["status"] for x in recs]
    assert_token_ok(r)
    assert all(x["assertion_sha256"] == sha(tok.content) for x in recs), "the retry did not present the file's token"


def test_aadsts700024_always(ctx):
    tok = kubelet(ctx)
    d = start(ctx, tok, tenant=ctx.tenant("aadsts-700024"))
    for i in range(3):
        r = get_token(d.port, f"https://aad-{i}.example.com")
        assert r.status != 400, f"AADSTS700024 answered with a sticky 400: {r!r}"
        assert_json_error(r, 503, "service_unavailable")
        n = ctx.fake.calls(d.tenant)
        assert n == 2 * (i + 1), f"after {i + 1} client requests the fake saw {n} calls, want {2 * (i + 1)}"
    time.sleep(0.5)
    assert ctx.fake.calls(d.tenant) == 6, "calls went on after the answers (a retry storm?)"


# ---- 7. cached tokens survive a rotation ----------------------------------------------------------

def test_cached_tokens_survive_rotation(ctx):
    tok = kubelet(ctx)
    d = start(ctx, tok)
    a = assert_token_ok(get_token(d.port))
    v = assert_token_ok(get_token(d.port, "https://vault.azure.net"), resource="https://vault.azure.net")
    assert ctx.fake.calls(d.tenant) == 2
    jwt, claims = new_jwt(sub="system:serviceaccount:default:rotated")
    t0 = time.time()
    tok.rotate(jwt)
    follow(d, t0, tok.path, jwt, claims)       # the daemon has certainly seen the rotation
    a2 = assert_token_ok(get_token(d.port))
    v2 = assert_token_ok(get_token(d.port, "https://vault.azure.net"), resource="https://vault.azure.net")
    assert a2["access_token"] == a["access_token"] and v2["access_token"] == v["access_token"], \
        "a rotation dropped cached access tokens"
    assert a2["expires_on"] == a["expires_on"]
    assert ctx.fake.calls(d.tenant) == 2, "a rotation caused Entra calls for cached tokens"
    assert_exchange_presents(ctx, d, "https://storage.azure.com/", jwt)


# ---- every exchange reads the file; SIGHUP re-reads ------------------------------------------------

def rewrite_inside_ts_dir(tok, content):
    """Changes the payload inside the current ..<ts> dir in place: nothing in the volume root changes,
    so a watch on the root cannot see it (imds-protocol.md section 4)."""
    target = os.path.join(tok.root, os.readlink(os.path.join(tok.root, "..data")), tok.rel)
    with open(target, "w") as f:
        f.write(content)
    tok.content = content


def test_every_exchange_reads_the_file(ctx):
    tok = kubelet(ctx)
    d = start(ctx, tok)
    assert_exchange_presents(ctx, d, "https://one.example.com", tok.content)
    jwt, _ = new_jwt(sub="system:serviceaccount:default:unwatched")
    rewrite_inside_ts_dir(tok, jwt)
    assert_exchange_presents(ctx, d, "https://two.example.com", jwt)


def test_sighup_rereads_token_file(ctx):
    tok = kubelet(ctx)
    d = start(ctx, tok)
    first = tok.content
    wait_log(d, is_loaded(first), "token_file_loaded for the start-up token", time.time(), timeout=3,
                 since="start-up")
    jwt, claims = new_jwt(sub="system:serviceaccount:default:hup", lifetime=5000)
    rewrite_inside_ts_dir(tok, jwt)
    time.sleep(0.3)
    seen_before = ready_with(claims)(readyz(d))      # a root watch cannot have seen this change
    t0 = time.time()
    os.kill(d.pid, signal.SIGHUP)
    e, _ = wait_log(d, is_loaded(jwt), f"token_file_loaded fp={fingerprint(jwt)} after SIGHUP", t0)
    assert_loaded_line(e, jwt, claims)
    r, _ = wait_readyz(d, ready_with(claims), "the re-read token", t0)
    assert_ready(r, tok.path, claims)
    time.sleep(0.2)
    assert d.alive(), "SIGHUP stopped imdsd"
    assert request(d.port, "/healthz").status == 200
    if seen_before:
        print("# note: the in-place change was seen before SIGHUP (the daemon watches more than the root)")
    os.kill(d.pid, signal.SIGHUP)                    # again, with nothing new: still alive, still ready
    time.sleep(0.3)
    assert d.alive(), "a second SIGHUP stopped imdsd"
    assert_ready(readyz(d), tok.path, claims)
    assert_exchange_presents(ctx, d, "https://after-hup.example.com", jwt)


# ---- 8. the token never reaches the log -------------------------------------------------------------

def _log_windows(text, size=24):
    """Every size-long substring of every base64url-alphabet run in text (a set, for quick lookups)."""
    out = set()
    for m in re.finditer(r"[A-Za-z0-9_-]{%d,}" % size, text):
        s = m.group(0)
        out.update(s[i:i + size] for i in range(len(s) - size + 1))
    return out


def _secret_windows(secret, size=24, step=12):
    """24-character slices (step 12) of a token's payload and signature (the JWT header is shared
    shape, not secret), or of the whole text when it is not a JWS."""
    parts = secret.split(".")[1:] if secret.count(".") == 2 else [secret]
    for part in parts:
        part = part.strip()
        for i in range(0, max(0, len(part) - size + 1), step):
            yield part[i:i + size]


def test_token_never_in_log(ctx):
    """Runs the life cycle once more (rotations, bad files, 700024, SIGHUP, /readyz) at debug level,
    then checks this daemon's log and the log of every daemon the tests above started: no service-
    account token (good or bad) and no access token, whole or in part."""
    tok = kubelet(ctx, nested=True)
    d = start(ctx, tok, log_level="debug")
    assert_token_ok(get_token(d.port))
    for i in range(3):
        j, c = new_jwt(sub=f"system:serviceaccount:default:secret-{i}")
        t0 = time.time()
        tok.rotate(j)
        wait_readyz(d, ready_with(c), "the new token", t0, timeout=3)
        get_token(d.port, f"https://secret-{i}.example.com")
    junk = "garbage" + os.urandom(30).hex()
    _SA.append(junk)
    for bad in (junk, new_jwt(payload=b'{"exp": "soon"')[0], new_jwt(exp=int(time.time()) - 900)[0]):
        tok.rotate(bad)
        time.sleep(0.2)
        get_token(d.port, "https://while-bad.example.com")
        readyz(d)
    tok.rotate(new_jwt()[0])
    time.sleep(0.2)
    ctx.fake.control(d.tenant, script=["aadsts-700024", "ok"])
    get_token(d.port, "https://after-700024.example.com")
    os.kill(d.pid, signal.SIGHUP)
    time.sleep(0.3)
    readyz(d)
    d.stop()
    checked, issued_by_fake = 0, {}
    for fake, dd in _DAEMONS:
        if dd.alive():
            continue
        log = dd.log()[: 16 << 20]    # a runaway log (another test's failure) is checked in part
        if not log:
            continue
        windows = _log_windows(log)
        if id(fake) not in issued_by_fake:     # one pass over each fake's record: the shared fake's
            by_tenant = issued_by_fake[id(fake)] = {}     # holds every exchange of this xdist worker
            for r in fake.records():
                if r.get("access_token"):
                    by_tenant.setdefault(r["tenant"], []).append(r["access_token"])
        issued = issued_by_fake[id(fake)].get(dd.tenant, [])
        for what, secrets in (("service-account token", _SA), ("access token", issued)):
            for s in secrets:
                if len(s.strip()) < 24:
                    continue
                assert s.strip() not in log, f"a whole {what} appears in {dd.name}'s log"
                leaked = next((w for w in _secret_windows(s) if w in windows), None)
                assert leaked is None, f"part of a {what} ({leaked!r}) appears in {dd.name}'s log"
        checked += 1
    assert checked >= 1
    print(f"# checked {checked} daemon logs against {len(_SA)} service-account tokens", flush=True)
