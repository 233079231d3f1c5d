"""Hostile clients (issue 23): connections that send pipelined requests and never read the answers,
requests that never finish, the largest requests the parser keeps, on both listeners at once and at
the defaults. What they may cost is fixed: the health listener has a pool of its own
(--max-health-connections), a stalled answer is evictable, nothing is read behind an answer the
client has not taken in, and what is kept for clients across all connections has one budget. A real
SDK client gets its token in under a second and the exec probe passes throughout, and resident
memory stays within 16 MiB."""
import errno
import os
import re
import resource
import socket
import subprocess
import sys
import time

import harness
from harness import free_port, raw_get, token_url, wait_for

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "compat"))
import sdk_clients as sdk  # noqa: E402
from sdk_clients import ARM, check_tokens  # noqa: E402

RSS_LIMIT_KIB = 16 * 1024


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith(field + ":")).split()[1])


def raise_nofile(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, want), hard))


def connect(port, rcvbuf=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    s.setblocking(False)
    return s


def push(s, data):
    """Sends what the socket takes now; a client that never reads soon cannot send more."""
    try:
        return s.send(data)
    except (BlockingIOError, ConnectionError):
        return 0


def non_readers(port, n, request, volume=16 * 1024):
    """n connections with a tiny receive buffer, each sending up to volume bytes of pipelined
    requests and never reading a byte of the answers (16 KiB of requests ask for three times the
    daemon's socket buffers in answers: each connection stalls)."""
    burst = request * (volume // len(request) + 1)
    socks = []
    for _ in range(n):
        try:
            s = connect(port, rcvbuf=1024)
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ECONNRESET):
                continue
            raise
        push(s, burst)
        socks.append(s)
    return socks


def keep_pushing(socks, request):
    """Sends each connection more of its requests, as a hostile client would keep doing."""
    for s in socks:
        push(s, request * 16)


def huge_arrivals(port, n):
    """n POSTs with a URL near the 4 KiB cap and most of a 4 KiB body, never finished: the most
    the parser keeps for a request still arriving."""
    path = token_url("https://" + "a" * 3900 + ".example/")[:4000]
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: true\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 4096\r\n\r\n").encode()
    socks = []
    for _ in range(n):
        try:
            s = connect(port)
        except OSError:
            continue
        push(s, head + b"r" * 4000)
        socks.append(s)
    return socks


def socket_memory(port):
    """The daemon's sockets on port as ss shows them: (count, largest receive buffer, largest send
    buffer, bytes queued in all of them), from skmem's rb, tb, r and w (kernel memory, charged to
    the daemon's memory cgroup under cgroup v2)."""
    out = subprocess.run(["ss", "-tmnH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    n, rb, tb, queued = 0, 0, 0, 0
    for m in re.finditer(r"skmem:\(r(\d+),rb(\d+),t(\d+),tb(\d+),f\d+,w(\d+)", out):
        r, rbuf, t, tbuf, w = map(int, m.groups())
        n, rb, tb, queued = n + 1, max(rb, rbuf), max(tb, tbuf), queued + r + w
    return n, rb, tb, queued


def sdk_token_ms(ctx, d, env, scope):
    res = sdk.run_py(ctx, "ManagedIdentityCredential", [scope], env)
    check_tokens(ctx, d.tenant, res, harness.CLIENT_ID)
    return res[0]["elapsed_ms"]


def probe_ok(ctx, hp, path="/healthz"):
    t0 = time.monotonic()
    rc, out, err = ctx.run(["--probe", f"127.0.0.1:{hp}{path}"], timeout=10)
    return rc, (time.monotonic() - t0) * 1000, err


def metric(port, name, required=True):
    r = harness.request(port, "/metrics")
    for line in r.body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    if required:
        raise AssertionError(f"{name} not in /metrics")
    return None


def test_non_readers_on_both_listeners_cannot_lock_out_tokens_or_probes(ctx):
    """The review's attack at the defaults, on both listeners at once: 1,030 connections to the
    health listener and 1,030 to the token listener, each pipelining GET /healthz with a 1 KiB
    receive buffer and never reading; then 1,030 POSTs that never finish, each holding a 4 KiB URL
    and 4 KiB of body. Before: every new token request was reset for 60 s, the SDK failed after
    12 s, and 500 such connections took 36.6 MB resident."""
    raise_nofile(8192)
    hp = free_port()
    d = ctx.daemon(extra=["--health-listen", f"127.0.0.1:{hp}"], log_level="info")
    env = sdk.imds_env(ctx, d.port)
    assert harness.get_token(d.port).status == 200
    measure = not harness.VALGRIND and not harness.LABEL   # ASan's quarantine and shadow memory
    n = 1030
    hz = raw_get("/healthz")
    socks = []
    times, probes = [], []
    try:
        socks += non_readers(hp, n, hz)
        socks += non_readers(d.port, n, hz)
        time.sleep(0.5 * ctx.scale)
        keep_pushing(socks, hz)
        for scope in (ARM, "https://vault.azure.net/.default"):
            times.append(sdk_token_ms(ctx, d, env, scope))
            rc, ms, err = probe_ok(ctx, hp)
            assert rc == 0, f"liveness probe failed under the non-reader flood: {err}"
            probes.append(ms)
            keep_pushing(socks, hz)
        rss_readers = status_kib(d.pid, "VmRSS")
        kernel = [socket_memory(p) for p in (d.port, hp)]
        socks += huge_arrivals(d.port, n)
        time.sleep(0.3 * ctx.scale)
        for scope in ("https://storage.azure.com/.default", ARM):
            times.append(sdk_token_ms(ctx, d, env, scope))
            rc, ms, err = probe_ok(ctx, hp, "/readyz")
            assert rc == 0, f"readiness probe failed under the mixed flood: {err}"
            probes.append(ms)
        rss_mixed = status_kib(d.pid, "VmRSS")
        buffered = metric(hp, "imdsd_http_buffered_bytes", required=False)
        hwm = status_kib(d.pid, "VmHWM")
    finally:
        for s in socks:
            s.close()
    assert d.alive()
    assert all(t < 1000 * ctx.scale for t in times), f"SDK token times under the floods: {times} ms"
    if measure:
        assert hwm <= RSS_LIMIT_KIB, f"peak RSS {hwm} KiB under hostile connections (limit {RSS_LIMIT_KIB})"
    # 16 KiB asked, doubled by the kernel; before: up to 4 MiB each for a client that never reads
    # (the health listener's may all have been shed by then: they were the oldest stalled)
    assert kernel[0][0] > 0, "no token-listener connection left to measure"
    for n_socks, rb, tb, queued in kernel:
        assert rb <= 32768 and tb <= 32768, f"socket buffers of {n_socks} sockets: rb {rb}, tb {tb}"
    assert buffered is not None and buffered <= 2 * 1024 * 1024 + 128 * 1024, f"{buffered} bytes buffered, budget 2 MiB"
    log = d.log()
    assert "http_connection_evicted" in log
    assert metric(hp, "imdsd_http_connections_evicted_total") > 0
    print(f"hostile: SDK token {times} ms, probes {[round(p) for p in probes]} ms, RSS {rss_readers} KiB "
          f"(non-readers), {rss_mixed} KiB (mixed), peak {hwm} KiB, buffered {int(buffered)} bytes; "
          f"kernel socket memory (sockets, max rb, max tb, queued bytes): tokens {kernel[0]}, health {kernel[1]}")


test_non_readers_on_both_listeners_cannot_lock_out_tokens_or_probes.timeout = 300


def test_health_listener_flood_leaves_token_pool_alone(ctx):
    """The health listener's pool is its own: 200 connections there that never read, with
    --max-health-connections 8, evict only each other; the token listener's connections, open
    before and after, are untouched and answer."""
    hp = free_port()
    d = ctx.daemon(extra=["--health-listen", f"127.0.0.1:{hp}", "--max-health-connections", "8",
                          "--max-connections", "20"])
    keep = [socket.create_connection(("127.0.0.1", d.port), timeout=5 * ctx.scale) for _ in range(15)]
    try:
        for s in keep:
            s.sendall(raw_get("/healthz"))
            assert harness.read_responses(s, 1, 5 * ctx.scale)[0][0].status == 200
        flood = non_readers(hp, 200, raw_get("/healthz"))
        for s in keep:   # every kept token-listener connection still serves
            s.sendall(raw_get("/healthz"))
            assert harness.read_responses(s, 1, 5 * ctx.scale)[0][0].status == 200
        assert harness.request(hp, "/healthz").status == 200
        assert harness.get_token(d.port).status == 200
        evicted = metric(hp, "imdsd_http_connections_evicted_total")
        assert evicted >= 200 - 8, f"{evicted} evictions for 200 connections to a pool of 8"
        for s in flood:
            s.close()
    finally:
        for s in keep:
            s.close()


def test_stalled_answer_evicted_oldest_first(ctx):
    """At the limit, a connection whose answer its client does not take in goes before a request
    still arriving; among stalled ones, the oldest stall first."""
    d = ctx.daemon(extra=["--max-connections", "4"], log_level="info")
    hz = raw_get("/healthz")
    arriving = socket.create_connection(("127.0.0.1", d.port), timeout=5 * ctx.scale)
    arriving.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    stalled = non_readers(d.port, 3, hz)
    time.sleep(0.3 * ctx.scale)
    fresh = []
    try:
        for i in range(2):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=5 * ctx.scale)
            s.sendall(hz)
            rs, _ = harness.read_responses(s, 1, 5 * ctx.scale)
            assert rs and rs[0].status == 200
            fresh.append(s)
            time.sleep(0.05)

        def reset(s):
            try:
                s.setblocking(True)
                s.settimeout(0.05)
                while True:
                    b = s.recv(65536)
                    if not b:
                        return True
            except socket.timeout:
                return False
            except ConnectionError:
                return True
        # the two oldest stalled connections were closed; the third stalled one and the arriving
        # request are still open
        wait_for(lambda: reset(stalled[0]) and reset(stalled[1]), 3 * ctx.scale, "the oldest stalled closed")
        arriving.sendall(b"\r\n")
        rs, _ = harness.read_responses(arriving, 1, 5 * ctx.scale)
        assert rs and rs[0].status == 200, "the arriving request was evicted before a stalled answer"
    finally:
        for s in stalled + fresh + [arriving]:
            s.close()
    assert "state=stalled" in d.log()


def test_header_timeout_applies_to_every_request(ctx):
    """--header-timeout holds for a request behind a keep-alive one, not only for a connection's
    first (before, the second was dropped by the idle timer only)."""
    d = ctx.daemon(extra=["--header-timeout", "2", "--idle-timeout", "20"])
    s = socket.create_connection(("127.0.0.1", d.port), timeout=10 * ctx.scale)
    try:
        s.sendall(raw_get("/healthz"))
        rs, _ = harness.read_responses(s, 1, 5 * ctx.scale)
        assert rs[0].status == 200
        time.sleep(0.5)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")   # never finished
        t0 = time.monotonic()
        s.settimeout(25)
        try:
            data = s.recv(4096)
        except ConnectionError:
            data = b""
        took = time.monotonic() - t0
    finally:
        s.close()
    assert data == b"", data[:100]
    assert took < 2 + 1.5 * ctx.scale, f"the half-sent second request was dropped after {took:.1f} s, not ~2 s"


def test_pipelined_input_beyond_the_budget_is_dropped_with_connection_close(ctx):
    """A client pipelining while the buffer budget is spent by input behind requests waiting on Entra gets its
    first answer with Connection: close; what it pipelined behind is not kept (it retries, RFC
    9112 section 9.3.2), and the daemon's buffered bytes stay at the budget."""
    gate = f"budget{os.getpid()}x{harness.unique()}"   # every exchange held at the stand-in Entra
    tenant = ctx.tenant(f"gate-{gate}")
    hp = free_port()
    d = ctx.daemon(tenant, extra=["--health-listen", f"127.0.0.1:{hp}"], log_level="info")
    hz = raw_get("/healthz")
    waiting = []
    try:
        # 300 connections, each a request held at Entra and pipelined requests behind it
        for i in range(300):
            s = connect(d.port)
            push(s, raw_get(token_url(f"https://held{i}.example/")) + hz * (63 * 1024 // len(hz)))
            waiting.append(s)
        wait_for(lambda: metric(hp, "imdsd_http_buffered_bytes") >= 2 * 1024 * 1024 - 64 * 1024, 10 * ctx.scale,
                 "the budget spent by pipelined input behind held requests")
        s = socket.create_connection(("127.0.0.1", d.port), timeout=5 * ctx.scale)
        s.sendall(hz * 200)
        data = b""
        s.settimeout(5 * ctx.scale)
        while True:
            b = s.recv(65536)
            if not b:
                break
            data += b
        s.close()
        rs, rest = harness.split_responses(data)
        assert rs and rs[0].status == 200
        assert rs[-1].headers.get("connection", "").lower() == "close", rs[-1].headers
        assert len(rs) < 200, "every pipelined request was kept beyond the budget"
        assert metric(hp, "imdsd_http_buffered_bytes") <= 2 * 1024 * 1024 + 128 * 1024
        assert metric(hp, "imdsd_http_connections_shed_total") >= 1
    finally:
        ctx.fake.release(gate)
        for s in waiting:
            s.close()
    assert harness.get_token(d.port).status == 200


def test_out_of_descriptors_does_not_spin(ctx):
    """Out of descriptors with a backlog that cannot be accepted and no spare descriptor left (a
    thread-pool open can take the spare between its close and its re-open; here the limit is set
    below every descriptor number but stdin, stdout and stderr, so neither the accept nor the
    re-open of the spare can succeed), while
    files are opened on the thread pool (the token file rotating): the loop does not spin, since
    the listeners rest, and it serves again once descriptors are back. Before, the spare was lost
    for good and the level-triggered listener woke the loop at once, forever: 100% CPU."""
    if harness.VALGRIND:
        import pytest
        pytest.skip("CPU time under valgrind says nothing about spinning")
    tenant = ctx.tenant("ok")
    d = ctx.daemon(tenant)
    assert harness.get_token(d.port).status == 200   # the Entra connection is open before the limit
    held = [socket.create_connection(("127.0.0.1", d.port), timeout=5 * ctx.scale) for _ in range(10)]
    for s in held:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")   # kept open, never finished
    time.sleep(0.2 * ctx.scale)
    soft, hard = resource.prlimit(d.pid, resource.RLIMIT_NOFILE)
    # the limit is on descriptor numbers: with 3, no new descriptor can be had at all
    resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (3, hard))
    backlog = []
    try:
        for _ in range(20):   # cannot be accepted: they wait in the backlog
            s = socket.create_connection(("127.0.0.1", d.port), timeout=1)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            backlog.append(s)
        t_end = time.monotonic() + 1
        while time.monotonic() < t_end:   # rotations: the pool opens and reads files meanwhile
            d.token.rotate()
            time.sleep(0.05)
        cpu0 = cpu_seconds(d.pid)
        time.sleep(2)
        cpu = cpu_seconds(d.pid) - cpu0
        assert d.alive()
        assert cpu < 0.5 * ctx.scale, f"{cpu:.2f} s of CPU in 2 s out of descriptors: the loop spins"
    finally:
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (soft, hard))
        for s in held + backlog:
            s.close()
    wait_for(lambda: harness.request(d.port, "/healthz", timeout=1).status == 200, 5 * ctx.scale, "serving again")
    assert "Too many open files" in d.log()


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return (int(parts[11]) + int(parts[12])) / tck
