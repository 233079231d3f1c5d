"""SIGTERM: prompt, clean exit 0 with connections open and an Entra call in flight."""
import http.client
import socket
import threading
import time

from harness import assert_json_error, assert_token_ok, get_token, raw_get, request


def test_sigterm_with_idle_connections(ctx):
    d = ctx.daemon()
    assert_token_ok(get_token(d.port))             # leaves an idle keep-alive connection to Entra too
    c = http.client.HTTPConnection("127.0.0.1", d.port, timeout=5)
    assert request(d.port, "/healthz", conn=c).status == 200   # and one idle client connection
    half = socket.create_connection(("127.0.0.1", d.port))
    half.sendall(b"GET /healthz HTTP/1.1\r\n")      # and one half-sent request
    try:
        d.stop(timeout=2)
        assert d.stop_seconds < 2 * ctx.scale
    finally:
        c.close()
        half.close()


def test_sigterm_with_fetch_in_flight(ctx):
    """A request still waiting for Entra when the grace period ends gets a 503 JSON answer."""
    tenant = ctx.tenant("slow-60")   # Entra answers long after the grace period, even under valgrind
    d = ctx.daemon(tenant, extra=["--shutdown-grace", "1"])
    result = {}

    def client():
        try:
            result["r"] = get_token(d.port, timeout=15)
        except Exception as e:
            result["e"] = e
    t = threading.Thread(target=client, daemon=True)
    t.start()
    time.sleep(0.5 * ctx.scale)
    assert ctx.fake.calls(tenant) == 1, "the fetch was not in flight"
    d.stop(timeout=3)
    t.join(3 * ctx.scale)
    assert not t.is_alive(), "the client is still waiting after the daemon exited"
    assert "r" in result, f"the in-flight request got no HTTP answer: {result.get('e')!r}"
    assert_json_error(result["r"], 503, "service_unavailable", "shutting down")


def test_survives_many_clients_then_stops_clean(ctx):
    d = ctx.daemon()
    socks = []
    for i in range(50):
        s = socket.create_connection(("127.0.0.1", d.port))
        s.sendall(raw_get()[: 10 + i])
        socks.append(s)
    assert_token_ok(get_token(d.port))
    try:
        d.stop(timeout=3)
    finally:
        for s in socks:
            s.close()


def test_grace_period_over_closes_a_client_that_does_not_read(ctx):
    """A keep-alive client pipelines requests and never reads the answers, so a response is stuck
    being written when SIGTERM comes: after --shutdown-grace every connection is closed, whatever
    its state, and the daemon exits (not after --idle-timeout)."""
    d = ctx.daemon(extra=["--shutdown-grace", "1", "--idle-timeout", "30"])
    assert_token_ok(get_token(d.port))          # cached: each answer below is a whole token
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", d.port))
    burst = raw_get() * 8000                    # ~10 MB of answers: more than both socket buffers

    def send():
        try:
            s.sendall(burst)
        except OSError:
            pass
    threading.Thread(target=send, daemon=True).start()
    try:
        time.sleep(1 * ctx.scale)               # the daemon writes until the buffers are full
        d.stop(timeout=5)
        assert d.stop_seconds < 4 * ctx.scale, f"exit took {d.stop_seconds:.1f}s"
    finally:
        s.close()
    assert "event=http_draining in_flight=1" in d.log(), "no response was being written at SIGTERM"
    assert "event=http_shutdown_close state=writing" in d.log()
