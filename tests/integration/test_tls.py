"""The daemon's HTTPS client fails closed, and reuses its connection to Entra."""
import socket
import threading
import time

import pytest

from harness import RESOURCE, assert_json_error, assert_token_ok, free_port, get_token, request, thread_nices


def fails_closed(ctx, d, fake):
    before = fake.stats()
    r = get_token(d.port, timeout=30)
    assert r.status in (500, 502, 503, 504), f"want 5xx, got {r!r}"
    assert_json_error(r, r.status)
    assert fake.records(d.tenant) == [], "a token request was completed over an unverified TLS connection"
    after = fake.stats()
    tried = (after["tls_failures"] - before["tls_failures"]) + (after["accepted"] - before["accepted"] - 1)
    assert tried >= 1, "the daemon never even connected to the fake"
    assert request(d.port, "/healthz").status == 200


def test_tls_wrong_hostname(ctx):
    d = ctx.daemon(fake=ctx.fake_wronghost, extra=["--entra-timeout", "3"])
    fails_closed(ctx, d, ctx.fake_wronghost)


def test_tls_unknown_ca(ctx):
    d = ctx.daemon(fake=ctx.fake_rogue, extra=["--entra-timeout", "3"])
    fails_closed(ctx, d, ctx.fake_rogue)


def test_tls_system_bundle_does_not_trust_test_ca(ctx):
    tenant, tok, port = ctx.tenant("ok"), ctx.token(), free_port()
    args = [a for a in ctx.daemon_args(tenant, tok, port, extra=["--entra-timeout", "3"])]
    i = args.index("--ca-file")
    del args[i:i + 2]
    d = ctx.daemon(tenant, tok, args=args, port=port)
    fails_closed(ctx, d, ctx.fake)


def test_tls_connection_refused(ctx):
    dead = free_port()
    tenant, tok, port = ctx.tenant("ok"), ctx.token(), free_port()
    args = ctx.daemon_args(tenant, tok, port, extra=["--entra-timeout", "3"])
    args[args.index("--authority-host") + 1] = f"https://localhost:{dead}/"
    d = ctx.daemon(tenant, tok, args=args, port=port)
    t0 = time.monotonic()
    r = get_token(d.port, timeout=30)
    assert r.status in (500, 502, 503, 504), r
    assert_json_error(r, r.status)
    assert time.monotonic() - t0 < 5 * ctx.scale


def test_tls_peer_speaks_plain_http(ctx):
    """The 'Entra' port answers in cleartext HTTP: a TLS failure, not a hang and not a token."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            try:
                c.settimeout(2)
                c.recv(4096)
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n"
                          b'{"token_type":"Bearer","expires_in":3599,"access_token":"x.y.z"}')
            except OSError:
                pass
            finally:
                c.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        tenant, tok, port = ctx.tenant("ok"), ctx.token(), free_port()
        args = ctx.daemon_args(tenant, tok, port, extra=["--entra-timeout", "3"])
        args[args.index("--authority-host") + 1] = f"https://localhost:{srv.getsockname()[1]}/"
        d = ctx.daemon(tenant, tok, args=args, port=port)
        r = get_token(d.port, timeout=30)
        assert r.status in (500, 502, 503, 504), r
        assert_json_error(r, r.status)
    finally:
        stop.set()
        t.join(2)
        srv.close()


def test_entra_connection_reused(ctx):
    d = ctx.daemon()
    for res in (RESOURCE, "https://vault.azure.net", "https://storage.azure.com/"):
        assert_token_ok(get_token(d.port, res), resource=res)
    conns = [r["conn"] for r in ctx.fake.records(d.tenant)]
    assert len(conns) == 3 and len(set(conns)) == 1, f"Entra requests used connections {conns}, want one reused"


def test_handshake_thread_runs_at_nice_19(ctx):
    """The TLS handshake's CPU work runs on a thread of its own at nice 19 (worker.h), so that the
    kernel runs the event loop first; the loop keeps the priority imdsd was started with."""
    d = ctx.daemon()
    base = thread_nices(d.pid)[d.pid]
    if base >= 19:
        pytest.skip(f"imdsd was started at nice {base}: no lower priority to give its worker")
    assert_token_ok(get_token(d.port))   # a new connection to Entra: a full handshake
    nices = thread_nices(d.pid)
    low = [tid for tid, n in nices.items() if n == 19]
    assert len(low) == 1 and low[0] != d.pid, f"threads and their nice values: {nices}"
    assert nices[d.pid] == base
    assert "worker_priority" not in d.log()
