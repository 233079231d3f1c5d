"""Hard limits on what a client can make the daemon hold: sizes, time, connections, descriptors."""
import http.client
import os
import resource
import select
import socket
import threading
import time

import harness
from harness import (Skip, assert_json_error, assert_token_ok, get_token, parse_raw, raw_exchange, raw_get,
                     request, token_url, wait_for)

REQ = f"GET {token_url()} HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: true\r\n"


def expect_error_and_close(ctx, port, data, status, what):
    got, closed = raw_exchange(port, data, timeout=5)
    r = parse_raw(got)
    assert r is not None, f"{what}: no HTTP response (got {got[:100]!r}, closed={closed})"
    assert r.status == status, f"{what}: status {r.status}, want {status}: {r!r}"
    assert_json_error(r, status)
    assert closed, f"{what}: connection left open after {status}"


def test_headers_over_8k_431(ctx):
    d = ctx.daemon()
    data = (REQ + "X-Padding: " + "a" * 9000 + "\r\n\r\n").encode()
    expect_error_and_close(ctx, d.port, data, 431, "9 KiB header")
    data = (REQ + "".join(f"X-Pad-{i}: {'b' * 110}\r\n" for i in range(60)) + "\r\n").encode()
    assert 7000 < len(data) < 8000, len(data)
    r = parse_raw(raw_exchange(d.port, data, timeout=5, one_response=True)[0])
    assert r is not None and r.status == 200, f"7 KiB of headers in 60 lines should be fine: {r!r}"
    assert ctx.fake.calls(d.tenant) == 1


def test_more_than_64_headers_431(ctx):
    d = ctx.daemon()
    data = (REQ + "".join(f"X-H{i}: v\r\n" for i in range(70)) + "\r\n").encode()
    expect_error_and_close(ctx, d.port, data, 431, "70 headers")
    assert ctx.fake.calls(d.tenant) == 0


def test_url_over_4k_414(ctx):
    d = ctx.daemon()
    path = token_url(resource="https://example.com/" + "a" * 5000)
    expect_error_and_close(ctx, d.port, raw_get(path), 414, "5 KiB URL")
    assert ctx.fake.calls(d.tenant) == 0
    res = "https://example.com/" + "a" * 1000     # a 3.9 KiB URL is still fine
    path = token_url(res, extra="&xms_cc=" + "c" * (3900 - len(token_url(res))))
    assert 3800 < len(path) < 4000
    assert_token_ok(request(d.port, path, {"Metadata": "true"}), resource=res)


def test_overlong_resource_is_a_client_error(ctx):
    """A resource the daemon will not handle is the caller's problem: 4xx, never a retryable 5xx."""
    d = ctx.daemon()
    r = get_token(d.port, "https://example.com/" + "a" * 3000)
    assert r.status in (400, 414), f"3 KiB resource -> {r!r}, want 400 (a 5xx makes clients retry for a minute)"
    assert_json_error(r, r.status)


def test_body_over_4k_413(ctx):
    d = ctx.daemon()
    data = (REQ + "Content-Length: 5000\r\n\r\n").encode() + b"x" * 5000
    expect_error_and_close(ctx, d.port, data, 413, "5000-byte body")
    t0 = time.monotonic()
    expect_error_and_close(ctx, d.port, (REQ + "Content-Length: 1000000\r\n\r\n").encode(), 413,
                           "Content-Length: 1000000 with no body sent")
    assert time.monotonic() - t0 < 3 * ctx.scale, "413 waited for a body it will refuse anyway"
    assert ctx.fake.calls(d.tenant) == 0


def test_malformed_http_400(ctx):
    d = ctx.daemon()
    cases = {
        "garbage request line": b"GARBAGE\r\n\r\n",
        "binary": b"\x00\x01\x02\x03\xff\r\n\r\n",
        "header without colon": b"GET /healthz HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
        "NUL in header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
        "bad Content-Length": b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        "two Content-Lengths": b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        "CL with TE": b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                      b"0\r\n\r\n",
        "bad chunk size": b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    }
    for what, data in cases.items():
        expect_error_and_close(ctx, d.port, data, 400, what)
    assert request(d.port, "/healthz").status == 200


def test_idle_timeout_partial_request(ctx):
    d = ctx.daemon(extra=["--idle-timeout", "1"])
    t0 = time.monotonic()
    got, closed = raw_exchange(d.port, b"GET /healthz HTTP/1.1\r\nHost:", timeout=6)
    took = time.monotonic() - t0
    assert closed, f"a stalled partial request was not disconnected within {6 * ctx.scale:.0f}s"
    assert 0.7 <= took <= 3 * ctx.scale, f"closed after {took:.1f}s with --idle-timeout 1"
    assert not got or parse_raw(got).status in (400, 408), f"unexpected answer {got[:100]!r}"


def test_idle_timeout_silent_connection(ctx):
    d = ctx.daemon(extra=["--idle-timeout", "1"])
    t0 = time.monotonic()
    got, closed = raw_exchange(d.port, b"", timeout=6)
    assert closed and time.monotonic() - t0 <= 3 * ctx.scale, "a silent connection was not closed"


def test_idle_timeout_slowloris(ctx):
    """Trickling a byte every 0.25 s does not extend the deadline for a complete request."""
    d = ctx.daemon(extra=["--idle-timeout", "1"])
    s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    t0, closed = time.monotonic(), False
    data = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 1000
    try:
        for b in data:
            try:
                s.sendall(bytes([b]))
            except OSError:
                closed = True
                break
            r, _, _ = select.select([s], [], [], 0.25)
            if r:
                try:
                    if not s.recv(4096):
                        closed = True
                        break
                except OSError:
                    closed = True
                    break
            if time.monotonic() - t0 > 6 * ctx.scale:
                break
    finally:
        s.close()
    took = time.monotonic() - t0
    assert closed and took <= 3 * ctx.scale, f"slowloris connection still open after {took:.1f}s"


def test_active_keepalive_not_idled_out(ctx):
    d = ctx.daemon(extra=["--idle-timeout", "1"])
    s = socket.create_connection(("127.0.0.1", d.port), timeout=5 * ctx.scale)
    try:
        for i in range(6):   # a request every 0.5 s for 3 s, on one connection
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(4096)
                assert chunk, f"connection closed before response {i + 1}"
                buf += chunk
            r = parse_raw(buf)
            while r is not None and len(r.body) < int(r.headers.get("content-length", 0)):
                buf += s.recv(4096)
                r = parse_raw(buf)
            assert r.status == 200, r
            time.sleep(0.5)
    finally:
        s.close()


def test_max_connections(ctx):
    """At --max-connections a new connection is admitted by closing the longest-idle keep-alive
    connection. When all are waiting for their answers, a new one is refused until the oldest has
    waited a second; then that one is answered 503 (Retry-After: 1, which SDKs retry) and closed
    to admit it."""
    d = ctx.daemon(extra=["--max-connections", "4"])
    conns = [http.client.HTTPConnection("127.0.0.1", d.port, timeout=5 * ctx.scale) for _ in range(4)]
    try:
        for c in conns:
            assert request(d.port, "/healthz", conn=c).status == 200
            time.sleep(0.01)   # conns[0] is the longest idle
        got, closed = raw_exchange(d.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", timeout=2, one_response=True)
        r = parse_raw(got)
        assert r is not None and r.status == 200, f"a new connection at the limit was not admitted: {got[:80]!r}"
        # the longest-idle one was closed for it; the others still work
        try:
            evicted = request(d.port, "/healthz", conn=conns[0]).status != 200
        except (OSError, http.client.HTTPException):
            evicted = True
        assert evicted, "the longest-idle keep-alive connection was not the one closed"
        for c in conns[2:]:
            assert request(d.port, "/healthz", conn=c).status == 200, "a newer idle connection was closed"
    finally:
        for c in conns:
            c.close()
    # every connection busy (their token requests held at the stand-in Entra): no room
    gate = f"mc{os.getpid()}n{harness.unique()}"   # a gate of this test's own: released gates stay open
    tenant = ctx.tenant(f"gate-{gate}")
    busy = ctx.daemon(tenant, extra=["--max-connections", "4"])
    results = []
    # four resources, so that each request holds an exchange of its own at the gate: then all four
    # have been read and are waiting (same-resource requests would share one exchange)
    threads = [threading.Thread(target=lambda i=i: results.append(
        get_token(busy.port, f"https://mc{i}.example/", timeout=20 * ctx.scale).status)) for i in range(4)]
    t0 = time.monotonic()   # no request can have waited longer than this
    for t in threads:
        t.start()
    wait_for(lambda: ctx.fake.gated(gate) >= 4, 5 * ctx.scale, "4 requests being answered")
    got, closed = raw_exchange(busy.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", timeout=2, one_response=True)
    r = parse_raw(got)
    refused = (r is None and closed) or (r is not None and r.status == 503)
    if time.monotonic() - t0 < 1.0:   # none had waited a second: the newcomer must be refused
        assert refused, f"a busy connection was evicted: {got[:80]!r}"
    else:   # a loaded machine got here late: the oldest may have waited a second already, then it goes
        assert refused or r.status == 200, got[:80]
    time.sleep(1.2)   # the oldest has waited past a second now
    got, closed = raw_exchange(busy.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", timeout=2, one_response=True)
    r = parse_raw(got)
    assert r is not None and r.status == 200, f"not admitted once the oldest waited a second: {got[:80]!r}"
    ctx.fake.release(gate)
    for t in threads:
        t.join()
    assert sorted(results) == [200, 200, 200, 503], results   # one eviction, by the first or the second
    assert "state=waiting" in busy.log()


def test_client_disconnects_mid_fetch(ctx):
    tenant = ctx.tenant("ok")
    ctx.fake.control(tenant, script=["slow-2"])
    d = ctx.daemon(tenant)
    socks = []
    for res in ("https://management.azure.com/", "https://vault.azure.net"):
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
            s.sendall(raw_get(token_url(res)))
            socks.append(s)
    time.sleep(0.3)
    for s in socks:
        s.close()
    time.sleep(2.5)
    assert d.alive(), "daemon died after clients disconnected mid-fetch"
    assert request(d.port, "/healthz").status == 200
    j = assert_token_ok(get_token(d.port))
    assert j["access_token"] in [r["access_token"] for r in ctx.fake.records(tenant) if r["status"] == 200]
    assert ctx.fake.calls(tenant) <= 3, f"{ctx.fake.calls(tenant)} Entra calls"


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_connection_churn_leaks_no_descriptors(ctx):
    d = ctx.daemon()
    assert_token_ok(get_token(d.port))          # warm: the Entra connection exists before the baseline
    time.sleep(0.2)
    before = fd_count(d.pid)
    for i in range(300):
        kind = i % 4
        s = socket.create_connection(("127.0.0.1", d.port), timeout=5 * ctx.scale)
        try:
            if kind == 0:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                while s.recv(4096):
                    pass
            elif kind == 1:
                s.sendall(b"GET /metadata/identity/oauth2/tok")      # partial, then gone
            elif kind == 2:
                s.sendall(b"NONSENSE\r\n\r\n")
            elif kind == 3:
                s.sendall(raw_get())
                s.recv(1)
        except OSError:
            pass
        finally:
            s.close()
    wait_for(lambda: fd_count(d.pid) <= before + 1, 3, f"descriptors to return to ~{before}")
    assert request(d.port, "/healthz").status == 200
    assert ctx.fake.calls(d.tenant) == 1


def test_out_of_descriptors_drops_connections_and_recovers(ctx):
    """At its descriptor limit the daemon closes the connections it cannot take, instead of
    spinning on a listening socket that stays readable, and serves again once descriptors free up."""
    if harness.VALGRIND:
        raise Skip("valgrind keeps descriptors of its own near the limit")
    d = ctx.daemon()
    assert_token_ok(get_token(d.port))                 # the Entra connection is open before the limit
    time.sleep(0.2)
    limit = fd_count(d.pid) + 3
    resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (limit, limit))
    held, dropped = [], 0
    try:
        for _ in range(10):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=5 * ctx.scale)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost:")   # partial: the daemon has to keep it open
            held.append(s)
        time.sleep(0.3 * ctx.scale)
        for s in held:
            r, _, _ = select.select([s], [], [], 0)
            if r:
                try:
                    dropped += s.recv(1) == b""
                except OSError:
                    dropped += 1
        assert 5 <= dropped <= 8, f"{dropped} of 10 connections were dropped at a limit of 3 free descriptors"
        t0 = harness.cpu_seconds(d.pid)
        time.sleep(1)
        busy = harness.cpu_seconds(d.pid) - t0
        assert busy < 0.3, f"the daemon used {busy:.2f} s of CPU in 1 s while out of descriptors"
        assert d.alive()
    finally:
        for s in held:
            s.close()
    wait_for(lambda: request(d.port, "/healthz", timeout=1).status == 200, 3 * ctx.scale,
             "/healthz after the held connections closed")
    assert "event=http_accept_failed" in d.log() and "Too many open files" in d.log()
    assert assert_token_ok(get_token(d.port))


def soft_nofile(pid):
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError(f"no 'Max open files' in /proc/{pid}/limits")


def test_descriptor_limit_raised_for_max_connections(ctx):
    """Started with the usual soft limit of 1024, the daemon raises it (up to the hard limit) so
    that --max-connections, not running out of descriptors, is what caps client connections."""
    if harness.VALGRIND:
        raise Skip("valgrind answers setrlimit(RLIMIT_NOFILE) itself")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 3064:
        raise Skip(f"the hard descriptor limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))   # what the daemon inherits
    try:
        d = ctx.daemon(extra=["--max-connections", "3000"])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    got = soft_nofile(d.pid)
    assert got >= 3064, f"soft descriptor limit {got} with --max-connections 3000"
    assert "fd_limit_low" not in d.log()
