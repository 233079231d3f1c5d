"""GET /metrics on the health listener: the Prometheus text format (checked by promtool), values the
test caused, no secret anywhere, nothing on the token listener, bounded per-token series, and a real
Prometheus server that scrapes imdsd and answers a query with a count the test caused."""
import base64
import http.client
import json
import os
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import harness
from harness import (CLIENT_ID, assert_json_error, assert_token_ok, free_port, get_token, request, token_url,
                     wait_for)

PROMTOOL = "/usr/bin/promtool"
PROMETHEUS = "/usr/bin/prometheus"
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')


def scrape(port, host="127.0.0.1", netns=None):
    r = request(port, "/metrics", host=host, netns=netns)
    assert r.status == 200, r
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8", r.headers
    return r.body.decode()


def promtool_ok(text):
    p = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
    assert p.returncode == 0 and not (p.stdout + p.stderr).strip(), f"promtool: {p.stdout}{p.stderr}"


def labels_of(s):
    """'a="x",b="y\\"z"' -> {a: x, b: y"z} (the exposition's escapes undone)."""
    out = {}
    for m in re.finditer(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', s or ""):
        out[m.group(1)] = re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n" else e.group(1), m.group(2))
    return out


def samples(text):
    """[(name, labels, value)] of every sample line."""
    out = []
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        out.append((m.group(1), labels_of(m.group(3)), float(m.group(4))))
    return out


def value(text, name, **labels):
    got = [v for n, l, v in samples(text) if n == name and all(l.get(k) == w for k, w in labels.items())]
    assert len(got) == 1, f"{name}{labels}: {len(got)} samples"
    return got[0]


def health_daemon(ctx, **kw):
    hp = free_port()
    d = ctx.daemon(extra=["--health-listen", f"127.0.0.1:{hp}"] + list(kw.pop("extra", ())), **kw)
    d.hp = hp
    return d


def test_metrics_count_what_happened(ctx):
    d = health_daemon(ctx)
    for _ in range(3):   # no Metadata header
        assert_json_error(request(d.port, token_url()), 400)
    first = get_token(d.port)
    assert_token_ok(first)
    assert_token_ok(get_token(d.port))
    assert request(d.port, "/metrics").status == 404, "metrics on the application's listener"
    assert request(d.hp, "/readyz").status == 200
    text = scrape(d.hp)
    promtool_ok(text)
    assert value(text, "imdsd_http_requests_total", endpoint="token", code="400") == 3
    assert value(text, "imdsd_http_requests_total", endpoint="token", code="200") == 2
    assert value(text, "imdsd_http_requests_total", endpoint="other", code="404") == 1
    assert value(text, "imdsd_http_requests_total", endpoint="readyz", code="200") == 1
    assert value(text, "imdsd_cache_hits_total") == 1 and value(text, "imdsd_cache_misses_total") == 1
    assert value(text, "imdsd_cache_waits_total") == 1
    assert value(text, "imdsd_entra_exchanges_total", outcome="ok") == 1
    assert value(text, "imdsd_entra_exchange_duration_seconds_count") == 1
    assert value(text, "imdsd_entra_failures_in_row") == 0
    left = value(text, "imdsd_token_expiry_seconds", client_id=CLIENT_ID, resource=harness.RESOURCE)
    assert 3500 < left <= int(first.json["expires_in"]) + 1, left
    assert 0 < value(text, "imdsd_token_refresh_seconds", client_id=CLIENT_ID, resource=harness.RESOURCE) < left
    assert value(text, "imdsd_token_file_state", state="ok") == 1
    assert sum(v for n, l, v in samples(text) if n == "imdsd_token_file_state") == 1
    exp = json.loads(base64.urlsafe_b64decode(d.token.content.split(".")[1] + "==="))["exp"]
    assert value(text, "imdsd_token_file_expiry_timestamp_seconds") == exp
    assert value(text, "imdsd_token_file_loads_total") == 1
    assert value(text, "imdsd_http_connections") >= 1
    assert value(text, "imdsd_build_info", version=open(os.path.join(harness.HERE, "..", "..", "VERSION")).read().strip()) == 1
    assert abs(value(text, "process_start_time_seconds") - time.time()) < 120 * ctx.scale
    # never a secret: not the access token, not the service-account token, not a piece of either
    for secret in (first.json["access_token"], d.token.content):
        for i in range(0, len(secret) - 24, 24):
            assert secret[i:i + 24] not in text, "a secret in /metrics"


def test_metrics_outcomes_retries_and_token_file_state(ctx):
    # a waiting client is answered before the throttled key's Retry-After (7 s) comes
    d = health_daemon(ctx, extra=["--entra-timeout", "3"])
    ctx.fake.control(d.tenant, script=["http503", "ok"])             # transient, then a retry that works
    assert_token_ok(get_token(d.port))
    ctx.fake.control(d.tenant, script=["http429"])                   # throttled
    assert get_token(d.port, resource="https://vault.azure.net").status == 429
    ctx.fake.control(d.tenant, script=["aadsts-700016"])             # permanent
    assert get_token(d.port, resource="https://graph.microsoft.com").status == 400
    text = scrape(d.hp)
    promtool_ok(text)
    got = {o: value(text, "imdsd_entra_exchanges_total", outcome=o) for o in ("ok", "throttled", "transient", "permanent")}
    assert got == {"ok": 1, "throttled": 1, "transient": 1, "permanent": 1}, got
    assert value(text, "imdsd_entra_retries_total") == 1
    assert value(text, "imdsd_entra_failures_in_row") == 2
    assert value(text, "imdsd_entra_exchange_duration_seconds_count") == 4
    assert value(text, "imdsd_http_requests_total", endpoint="token", code="429") == 1
    # the token file disappears: the state gauge follows, its expiry goes to 0
    os.unlink(os.path.join(d.token.root, "..data"))
    wait_for(lambda: value(scrape(d.hp), "imdsd_token_file_state", state="missing") == 1, 5, "state=missing")
    assert value(scrape(d.hp), "imdsd_token_file_expiry_timestamp_seconds") == 0


def test_metrics_labels_escaped_and_series_bounded(ctx):
    d = health_daemon(ctx)
    hostile = 'https://example.com/"quoted"\\back\u00e9'
    assert_token_ok(get_token(d.port, resource=hostile), resource=hostile)
    long = "https://long.example.com/" + "a" * 1500
    assert_token_ok(get_token(d.port, resource=long), resource=long)
    for i in range(69):
        assert_token_ok(get_token(d.port, resource=f"https://r{i}.example.com"), resource=f"https://r{i}.example.com")
    text = scrape(d.hp)
    promtool_ok(text)
    series = [l for n, l, v in samples(text) if n == "imdsd_token_expiry_seconds"]
    assert len(series) == 64, len(series)
    assert value(text, "imdsd_cache_tokens") == 71 and value(text, "imdsd_cache_entries") == 71
    cut = [l["resource"] for l in series if l["resource"].startswith("https://long.")]
    assert cut == [long[:256] + "..."], cut   # label values are cut at 256 bytes
    # the one requested first expires first, so it is among the 64
    assert 'https://example.com/"quoted"\\back??' in [l["resource"] for l in series], \
        [l["resource"] for l in series][:3]


def test_metrics_connections_evicted_at_the_limit(ctx):
    # the scraper's connection is in the health listener's pool, not in the token listeners' 2
    d = health_daemon(ctx, extra=["--max-connections", "2"])
    held = [http.client.HTTPConnection("127.0.0.1", d.port, timeout=5 * ctx.scale) for _ in range(2)]
    scraper = http.client.HTTPConnection("127.0.0.1", d.hp, timeout=5 * ctx.scale)
    try:
        for c in held:
            assert request(d.port, "/healthz", conn=c).status == 200
        time.sleep(0.01)
        assert value(scrape_on(scraper), "imdsd_http_connections") == 3
        # a new connection at the limit: the longest-idle keep-alive connection makes room
        got, _ = harness.raw_exchange(d.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", timeout=2,
                                      one_response=True)
        assert harness.parse_raw(got).status == 200, got[:80]
        text = scrape_on(scraper)
        promtool_ok(text)
        assert value(text, "imdsd_http_connections_evicted_total") == 1
        assert value(text, "imdsd_http_connections_refused_total") == 0
    finally:
        for c in held + [scraper]:
            c.close()


def scrape_on(conn):
    r = request(0, "/metrics", conn=conn)
    assert r.status == 200, r
    return r.body.decode()
