"""The Azure Arc challenge (--arc-key-dir, --arc-key-group): on a shared VM every local user can
reach loopback, so each token request first gets 401 with WWW-Authenticate: Basic realm=<a new key
file> that only imdsd's user and the group can read; the answer Authorization: Basic <key> is good
once, for a minute. The real Python and JavaScript clients (IDENTITY_ENDPOINT + IMDS_ENDPOINT) get
tokens; a second Unix user outside the group gets none."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import harness
from harness import CLIENT_ID, free_port, log_events, request, token_url, unprivileged_prefix

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "compat"))
import sdk_clients as sdk  # noqa: E402
from sdk_clients import ARM, GRAPH, VAULT, check_tokens  # noqa: E402

MIC = "ManagedIdentityCredential"
PIDNS = ["/usr/bin/unshare", "--pid", "--fork", "--kill-child"]   # imdsd as pid 1, like a container's
GROUP = 65532          # may read the key files
OUTSIDER = 65533       # may not


def key_dir(ctx):
    d = os.path.join(ctx.tmp, "arc-tokens")
    os.makedirs(d)
    os.chmod(d, 0o755)
    return d


def challenge(d):
    r = request(d.port, token_url(), {"Metadata": "true"})
    assert r.status == 401 and r.json["error"] == "unauthorized_client", r
    realm = r.headers["www-authenticate"]
    assert realm.startswith("Basic realm="), realm
    return realm.split("=", 1)[1]


def test_arc_challenge_rules(ctx):
    kd = key_dir(ctx)
    d = ctx.daemon(extra=["--arc-key-dir", kd, "--arc-key-group", str(GROUP)])
    path = challenge(d)
    st = os.stat(path)
    assert os.path.dirname(path) == kd and path.endswith(".key"), path
    assert st.st_mode & 0o777 == 0o640 and st.st_gid == GROUP, oct(st.st_mode)
    key = open(path).read()
    assert len(key) == 64 and key not in d.log(), "the key in the log"
    # a wrong key: 401 and no new challenge; the right one: a token, once; the file is gone
    r = request(d.port, token_url(), {"Metadata": "true", "Authorization": "Basic " + "0" * 64})
    assert r.status == 401 and "www-authenticate" not in r.headers, r
    r = request(d.port, token_url(), {"Metadata": "true", "Authorization": "Basic " + key})
    harness.assert_token_ok(r)
    harness.wait_for(lambda: not os.path.exists(path), 2, "the used key file removed")
    r = request(d.port, token_url(), {"Metadata": "true", "Authorization": "Basic " + key})
    assert r.status == 401, "a key was good twice"
    # no Metadata: still IMDS's 400 first, and no key file for it
    assert request(d.port, token_url()).status == 400
    # (a flood of challenges: test_arc_flood)
    d.stop()
    harness.wait_for(lambda: not os.listdir(kd), 3, "the key files removed at shutdown")


def test_arc_real_clients_and_a_second_user(ctx):
    kd = key_dir(ctx)
    d = ctx.daemon(extra=["--arc-key-dir", kd, "--arc-key-group", str(GROUP)])
    env = sdk.arc_env(ctx, d.port)
    os.chmod(env["HOME"], 0o777)
    res = sdk.run_py(ctx, MIC, [ARM, VAULT], env)
    check_tokens(ctx, d.tenant, res, CLIENT_ID)
    # a user in the group gets a token; a user outside it cannot read the key file: no token
    ingroup = ["/usr/bin/setpriv", "--reuid=65534", f"--regid={GROUP}", "--clear-groups", "--inh-caps=-all",
               "--bounding-set=-all"]
    res = sdk.run_py(ctx, MIC, [GRAPH], env, prefix=ingroup)
    check_tokens(ctx, d.tenant, res, CLIENT_ID)
    res = sdk.run_py(ctx, MIC, ["https://storage.azure.com/.default"], env, prefix=unprivileged_prefix(OUTSIDER),
                     timeout=sdk.fail_fast_timeout())
    assert not res[0]["ok"] and res[0]["token"] is None, res
    assert "ermission" in res[0]["error"]["message"] + str(res[0]["error"].get("cause")), res[0]["error"]
    assert "https://storage.azure.com" not in [r["scope"].rstrip("/") for r in ctx.fake.records(d.tenant)]


def test_arc_key_dir_writers_and_group(ctx):
    """A key directory others can write is refused at start-up (exit 2, one line naming the setting
    and the directory); a setgid directory's group does not become the key files' group."""
    kd = key_dir(ctx)
    args = ctx.daemon_args(ctx.tenant("ok"), ctx.token(), free_port(), extra=["--arc-key-dir", kd])
    for uid, gid, mode in ((0, 0, 0o777), (0, 0, 0o1777), (0, 100, 0o775), (1234, 0, 0o755)):
        os.chown(kd, uid, gid)
        os.chmod(kd, mode)
        rc, out, err = ctx.run(args, timeout=5)
        lines = [l for l in err.splitlines() if l.strip()]
        assert rc == 2 and len(lines) == 1, (rc, err)
        assert lines[0].startswith(f"imdsd: --arc-key-dir: '{kd}' "), lines[0]
        assert not os.listdir(kd)
    # drwxr-sr-x root:users: without --arc-key-group the key file is imdsd's group, not users
    os.chown(kd, 0, 100)
    os.chmod(kd, 0o2755)
    d = ctx.daemon(extra=["--arc-key-dir", kd])
    st = os.stat(challenge(d))
    assert st.st_gid == os.getegid() and st.st_mode & 0o777 == 0o640, (st.st_gid, oct(st.st_mode))


def inner_pid(d):
    """The pid (outside) of the imdsd that PIDNS started, checked to be pid 1 inside its namespace."""
    with open(f"/proc/{d.pid}/task/{d.pid}/children") as f:
        kids = f.read().split()
    assert len(kids) == 1, kids
    nspid = [l.split()[1:] for l in open(f"/proc/{kids[0]}/status") if l.startswith("NSpid:")][0]
    assert nspid[-1] == "1", nspid
    return int(kids[0])


def stop_inner(d, sig):
    """unshare does not pass SIGTERM on: signal the imdsd inside, then reap unshare."""
    os.kill(inner_pid(d), sig)
    rc = d.proc.wait(10 * harness.SCALE)
    d.stopped = True
    d.logf.close()
    if sig == signal.SIGTERM:
        harness.check_tool_output(d.log(), d.vg_log())
        assert rc == 0, f"{d.name} exited with {rc}"


def test_arc_instances_share_a_key_dir(ctx):
    """Two imdsd that are both pid 1 (two containers) on one key directory: the second start leaves
    the first's live key files; a killed one's files go at the next start, a live one's stay."""
    kd = key_dir(ctx)
    extra = ["--arc-key-dir", kd]
    d1 = ctx.daemon(extra=extra, prefix=PIDNS)
    inner_pid(d1)
    path1, path1b = challenge(d1), challenge(d1)
    d2 = ctx.daemon(extra=extra, prefix=PIDNS)
    path2 = challenge(d2)
    assert os.path.exists(path1) and os.path.exists(path1b), sorted(os.listdir(kd))
    r = request(d1.port, token_url(), {"Metadata": "true", "Authorization": "Basic " + open(path1).read()})
    harness.assert_token_ok(r)
    stop_inner(d1, signal.SIGKILL)                 # a crash: path1b stays behind
    assert os.path.exists(path1b)
    d3 = ctx.daemon(extra=extra, prefix=PIDNS)
    assert not os.path.exists(path1b), "a dead instance's key file left"
    assert os.path.exists(path2), "a live instance's key file removed"
    r = request(d2.port, token_url(), {"Metadata": "true", "Authorization": "Basic " + open(path2).read()})
    harness.assert_token_ok(r)
    challenge(d3)
    stop_inner(d2, signal.SIGTERM)
    stop_inner(d3, signal.SIGTERM)
    assert not os.listdir(kd), sorted(os.listdir(kd))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS:")).split()[1])


def key_files(kd):
    return [f for f in os.listdir(kd) if f.endswith(".key")]


# A client of its own Unix user: challenges on one keep-alive connection as fast as Python sends
# them, never answered; argv: port, URL, then "seconds S" (for S seconds), "count N" (N requests)
# or "realms N" (until N challenges were answered, waiting 50 ms after each 429). Prints
# {"got": {status: n}, "rate": requests per second, "realms": [key file, ...]}. Every refusal is
# checked: 429, Retry-After 1, IMDS's JSON error.
CHALLENGER = r"""
import http.client, json, sys, time
port, url, mode, n = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
got, realms, k, t0 = {}, [], 0, time.monotonic()
while not ((mode == "seconds" and time.monotonic() - t0 >= n) or (mode == "count" and k >= n)
           or (mode == "realms" and len(realms) >= n)):
    conn.request("GET", url, headers={"Metadata": "true"})
    r = conn.getresponse()
    body = r.read()
    k += 1
    got[r.status] = got.get(r.status, 0) + 1
    if r.status == 429:
        assert r.getheader("Retry-After") == "1" and b'"error":"too_many_requests"' in body, (r.headers, body)
        if mode == "realms":
            time.sleep(0.05)
    else:
        assert r.status == 401 and r.getheader("WWW-Authenticate", "").startswith("Basic realm="), r.status
        realms.append(r.getheader("WWW-Authenticate").split("=", 1)[1])
print(json.dumps({"got": got, "rate": k / (time.monotonic() - t0), "realms": realms}))
"""


def challenger(uid, port, mode, n):
    """Starts CHALLENGER as uid (group uid, no other group): its socket is uid's, the user imdsd
    counts its challenges against."""
    return subprocess.Popen([sys.executable, "-c", CHALLENGER, str(port), token_url(), mode, str(n)],
                            user=uid, group=uid, extra_groups=[], cwd="/", stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def challenger_result(p, timeout=30):
    out, err = p.communicate(timeout=timeout * harness.SCALE)
    assert p.returncode == 0, err
    res = json.loads(out)
    res["got"] = {int(k): v for k, v in res["got"].items()}
    return res


def metric(hp, name):
    text = request(hp, "/metrics").body.decode()
    return int(next(l.split()[1] for l in text.splitlines() if l.startswith(name + " ")))


FLOODERS = [64000 + i for i in range(9)]   # nine users: their shares (32 each) exceed the 256 slots


def test_arc_flood(ctx):
    """Local floods of challenges (no key ever read) from nine users, more than 256 slots hold at 32
    a user, cannot push out a slower client's key: past 100 new keys a second, and once 256 keys
    are live, challenges get 429 with Retry-After: 1, counted in imdsd_arc_challenges_refused_total
    and logged once per 1000. The victim reads its key after the flood and still gets its token."""
    kd = key_dir(ctx)
    hp = free_port()
    d = ctx.daemon(extra=["--arc-key-dir", kd, "--health-listen", f"127.0.0.1:{hp}"], log_level="info")
    victim = challenge(d)
    rss0, cpu0 = rss_kib(d.pid), harness.cpu_seconds(d.pid)
    procs = [challenger(uid, d.port, "seconds", 3.5) for uid in FLOODERS]
    res = [challenger_result(p) for p in procs]
    rss1, cpu = rss_kib(d.pid), harness.cpu_seconds(d.pid) - cpu0
    got = {s: sum(r["got"].get(s, 0) for r in res) for s in (401, 429)}
    print(f"flood: {sum(got.values())} challenges from {len(res)} users at {sum(r['rate'] for r in res):.0f}/s: "
          f"{got}; {len(key_files(kd))} key files; imdsd {cpu:.2f} s CPU, RSS {rss0} -> {rss1} KiB")
    if not harness.LABEL and not harness.VALGRIND:   # a refusal allocates nothing that stays
        assert rss1 - rss0 < 256, (rss0, rss1)
    assert os.path.exists(victim), "the flood took the victim's key"
    r = request(d.port, token_url(), {"Metadata": "true", "Authorization": "Basic " + open(victim).read()})
    harness.assert_token_ok(r)
    assert got[401] + 1 == 256, got                     # 100 a second, then full
    assert all(r["got"].get(401, 0) <= 32 for r in res), [r["got"] for r in res]
    assert got[429] > 1000 and len(key_files(kd)) <= 256, got
    # every slot live: a user with no key yet is refused too (max_keys: not its share), the file
    # count stays
    per_user = metric(hp, "imdsd_arc_challenges_refused_per_user_total")
    more = challenger_result(challenger(64100, d.port, "count", 2000))["got"]
    assert more.get(401, 0) <= 1 and len(key_files(kd)) <= 256, more
    assert metric(hp, "imdsd_arc_challenges_refused_per_user_total") == per_user
    refused = got[429] + more.get(429, 0)
    assert metric(hp, "imdsd_arc_challenges_refused_total") == refused
    lines = log_events(d.log(), "arc_challenge_refused")
    assert len(lines) == (refused + 999) // 1000, (len(lines), refused)
    assert lines[-1]["refused_total"] == str((len(lines) - 1) * 1000 + 1), lines[-1]
    assert {l["reason"] for l in lines} <= {"max_per_second", "max_keys", "per_user"}, lines
    assert {l["uid"] for l in lines} <= {str(u) for u in FLOODERS + [64100]}, lines


def test_arc_flood_of_one_user(ctx):
    """One local user floods challenges and never answers them: it holds its share, 32 keys, and is
    refused past it (429, reason=per_user); meanwhile a client of another user (root) still gets its
    challenge, reads its key and gets its token within a second, again and again during the flood.
    (Before the share, the flood took 100 keys a second, then all 256 slots: every other client got
    429 for the flood's length and up to 60 s after.)"""
    kd = key_dir(ctx)
    hp = free_port()
    d = ctx.daemon(extra=["--arc-key-dir", kd, "--health-listen", f"127.0.0.1:{hp}"], log_level="info")
    flooder = challenger(65534, d.port, "seconds", 4)
    harness.wait_for(lambda: metric(hp, "imdsd_arc_challenges_refused_total") > 0, 10, "the flood refused")
    times = []
    while flooder.poll() is None and len(times) < 8:
        t0 = time.monotonic()
        r = request(d.port, token_url(), {"Metadata": "true"})
        assert r.status == 401, (r.status, r.json)      # not 429
        path = r.headers["www-authenticate"].split("=", 1)[1]
        r = request(d.port, token_url(), {"Metadata": "true", "Authorization": "Basic " + open(path).read()})
        harness.assert_token_ok(r)
        times.append(time.monotonic() - t0)
        time.sleep(0.2)
    flood = challenger_result(flooder)
    print(f"flood of uid 65534: {flood['got']} at {flood['rate']:.0f}/s; the other user's challenge, key and token "
          f"during it: {', '.join(f'{t * 1000:.1f}' for t in times)} ms")
    assert len(times) >= 5 and max(times) < 1.0 * harness.SCALE, times
    assert flood["got"].get(401) == 32 and flood["got"].get(429, 0) > 1000, flood["got"]
    harness.wait_for(lambda: len(key_files(kd)) == 32, 2, "the flooder's 32 keys left (the other user's used)")
    refused = flood["got"][429]
    assert metric(hp, "imdsd_arc_challenges_refused_per_user_total") == refused
    assert metric(hp, "imdsd_arc_challenges_refused_total") == refused
    lines = log_events(d.log(), "arc_challenge_refused")
    assert len(lines) == (refused + 999) // 1000, (len(lines), refused)
    assert all(l["reason"] == "per_user" and l["uid"] == "65534" for l in lines), lines


def refused_then_freed(d, run_client):
    """Fills the share of root's keys (the clients here run as root) at 100 a second, runs
    run_client() in a thread, and once its challenge has been refused, answers five of the filling
    challenges so that five of root's slots free up; returns what run_client returned."""
    paths = []
    while len(paths) < 32:
        r = request(d.port, token_url(), {"Metadata": "true"})
        if r.status == 401:
            paths.append(r.headers["www-authenticate"].split("=", 1)[1])
        else:
            assert r.status == 429, r
            time.sleep(0.05)
    assert request(d.port, token_url(), {"Metadata": "true"}).status == 429
    refusals = lambda: len([e for e in log_events(d.log(), "request_rejected") if e["status"] == "429"])  # noqa: E731
    before = refusals()
    res = []
    t = threading.Thread(target=lambda: res.append(run_client()))
    t.start()
    harness.wait_for(lambda: refusals() > before, 10, "the client's challenge refused")
    for p in paths[:5]:
        r = request(d.port, token_url(), {"Metadata": "true", "Authorization": "Basic " + open(p).read()})
        harness.assert_token_ok(r)
    t.join(60)
    assert res, "the client did not finish"
    return res[0]


def test_arc_sdk_retries_a_refused_challenge(ctx):
    """The real Python client, refused while its user's share of the slots holds live keys, retries
    after Retry-After and gets its token once keys are used and slots free up."""
    kd = key_dir(ctx)
    d = ctx.daemon(extra=["--arc-key-dir", kd, "--arc-key-group", str(GROUP)])
    res = refused_then_freed(d, lambda: sdk.run_py(ctx, MIC, [ARM], sdk.arc_env(ctx, d.port)))
    check_tokens(ctx, d.tenant, res, CLIENT_ID)
    assert res[0]["process_seconds"] >= 0.9, res   # it waited out a Retry-After
