"""One connection, several requests: what a client does around a request being answered must not
lose it. Pipelining past the input buffer, half-closing after the last request, and a pipelined
request that makes the token cache evict the very entry whose answer is being sent (issue 12)."""
import http.client
import os
import socket
import threading
import time

import harness
from harness import (assert_json_error, assert_token_ok, concurrently, parse_raw, raw_get, read_responses,
                     request, split_responses, token_url, wait_for)


def gate_name(ctx, what):
    return f"{what}{os.getpid()}x{harness.unique()}"


def read_until_closed(sock, timeout):
    """Everything the peer sends until it closes (or timeout): (bytes, closed)."""
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            b = sock.recv(65536)
        except socket.timeout:
            return data, False
        except ConnectionResetError:
            return data, True
        if not b:
            return data, True
        data += b
    return data, False


def test_pipelined_request_evicts_the_entry_being_answered(ctx):
    """The review's use-after-free: a keep-alive client pipelines GET T and GET N while T is in
    flight; meanwhile 1023 other resources fill the cache (fast permanent errors); when T's token
    arrives its answer is written at once, the parser goes on to N, and N, a new key in a full
    cache, evicts the least recently used idle entry: T, whose completion is still on the stack."""
    tenant = ctx.tenant("aadsts-500011")       # every resource but T: a permanent error at once
    gate = gate_name(ctx, "evict")
    # T is held at the gate while 1023 requests fill the cache: under valgrind on a loaded machine
    # that outlasts the default --entra-timeout (15 s), which would answer T 503 first
    d = ctx.daemon(tenant, log_level="info", extra=["--entra-timeout", "300"])
    ctx.fake.control(tenant, script=[f"gate-{gate}"])
    t_res, n_res = "https://t.example/", "https://n.example/"
    s = socket.create_connection(("127.0.0.1", d.port), timeout=10 * ctx.scale)
    try:
        s.sendall(raw_get(token_url(t_res)) + raw_get(token_url(n_res)))
        wait_for(lambda: ctx.fake.gated(gate) == 1, 10, "T's exchange to be held at the stand-in Entra")
        time.sleep(0.02)                       # T is used strictly before every other entry

        def fill(i):
            c = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30 * ctx.scale)
            try:
                bad = []
                for k in range(i, 1023, 8):
                    r = request(d.port, token_url(f"https://fill{k}.example/"), {"Metadata": "true"}, conn=c)
                    if r.status != 400:
                        bad.append(r)
                return bad
            finally:
                c.close()
        results = concurrently(8, fill, timeout=120)
        for r in results:
            assert r == [], f"filling the cache: {r!r}"[:300]
        ctx.fake.release(gate)
        rs, _ = read_responses(s, 2, 15 * ctx.scale)
    finally:
        s.close()
    assert [r.status for r in rs] == [200, 400], [(r.status, r.body[:100]) for r in rs]
    assert_token_ok(rs[0], resource=t_res)
    assert_json_error(rs[1], 400, "invalid_resource")
    assert d.alive(), "the daemon died answering T"
    assert request(d.port, "/healthz").status == 200


def test_input_behind_a_request_in_flight_never_drops_it(ctx):
    """A client with 20 KiB of pipelined requests buffered behind a request in flight sends 64 KiB
    more in one write: the daemon reads only what it can keep, the rest waits in the socket, and
    every request is answered in order on the same connection."""
    tenant = ctx.tenant("ok")
    gate = gate_name(ctx, "pipe")
    d = ctx.daemon(tenant, log_level="info")
    ctx.fake.control(tenant, script=[f"gate-{gate}"])
    hz = raw_get("/healthz")
    first, second = hz * (20 * 1024 // len(hz)), hz * (64 * 1024 // len(hz) + 1)
    s = socket.create_connection(("127.0.0.1", d.port), timeout=10 * ctx.scale)
    got = {}

    def reader():
        got["rs"], got["rest"] = read_responses(s, 1 + (len(first) + len(second)) // len(hz), 30 * ctx.scale)
    try:
        s.sendall(raw_get(token_url("https://inflight.example/")))
        wait_for(lambda: ctx.fake.gated(gate) == 1, 10, "the exchange to be held at the stand-in Entra")
        s.sendall(first)
        time.sleep(0.2 * ctx.scale)            # read and kept behind the request in flight
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        s.sendall(second)                      # one write: up to 64 KiB in one read
        time.sleep(0.2 * ctx.scale)
        ctx.fake.release(gate)
        t.join(40 * ctx.scale)
    finally:
        s.close()
    rs = got.get("rs", [])
    want = 1 + (len(first) + len(second)) // len(hz)
    assert len(rs) == want, f"{len(rs)} of {want} responses before the connection ended"
    assert_token_ok(rs[0], resource="https://inflight.example/")
    assert all(r.status == 200 and r.json == {"status": "ok"} for r in rs[1:]), \
        [(r.status, r.body[:60]) for r in rs[1:] if r.status != 200][:3]
    assert d.alive()


def half_closed_exchange(ctx, port, data):
    s = socket.create_connection(("127.0.0.1", port), timeout=10 * ctx.scale)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)             # what printf ... | nc -N does
        return read_until_closed(s, 15 * ctx.scale)
    finally:
        s.close()


def test_half_close_after_the_request_still_gets_the_answer(ctx):
    """A client that shuts down its sending side right after its request gets its answer, whether
    the token is cached or not, and then the connection closes; requests pipelined before the
    half-close are all answered, in order."""
    tenant = ctx.tenant()
    d = ctx.daemon(tenant)
    ctx.fake.control(tenant, default="slow-0.3")   # a cold token takes a while
    cold = "https://halfclose.example/"
    data, closed = half_closed_exchange(ctx, d.port, raw_get(token_url(cold)))
    r = parse_raw(data)
    assert r is not None, f"no answer to a half-closed request for a cold token (closed={closed})"
    assert_token_ok(r, resource=cold)
    assert closed, "the connection stayed open after the answer"
    data, closed = half_closed_exchange(ctx, d.port, raw_get(token_url(cold)))   # cached now
    assert_token_ok(parse_raw(data), resource=cold)
    assert closed
    cold2 = "https://halfclose2.example/"
    data, closed = half_closed_exchange(
        ctx, d.port, raw_get(token_url(cold2)) + raw_get("/healthz") + raw_get(token_url(cold)))
    rs, rest = split_responses(data)
    assert [r.status for r in rs] == [200, 200, 200] and not rest, [(r.status, r.body[:60]) for r in rs]
    assert_token_ok(rs[0], resource=cold2)
    assert_token_ok(rs[2], resource=cold)
    assert closed
    # half a request, then the half-close: nothing to answer, the connection just closes
    data, closed = half_closed_exchange(ctx, d.port, raw_get()[:20])
    assert closed and data == b"", data[:100]
    assert ctx.fake.calls(tenant) == 2
