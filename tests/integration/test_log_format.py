"""--log-format json: one JSON object per line with the same fields as the logfmt lines, for log
pipelines (Fluent Bit, Vector, Loki). Two daemons go through the same hostile session (control
characters, invalid UTF-8 and quotes in requests and in Entra's answers, a rotation, SIGHUP); every
line of the JSON one parses with a JSON parser and the two logs carry the same events and keys."""
import collections
import json
import signal

import harness
from harness import get_token, log_events, raw_exchange, request, token_url, wait_for

HOSTILE = [
    token_url(resource="https://vault.azure.net/\x01\"quoted\"\\"),                  # control byte, quotes
    token_url(resource="https://x/%FF%FE%C3%28") + "&client_id=%0Aforged%3D1%20event%3Dx",  # invalid UTF-8
    token_url() + "&object_id=\"><script>",
]


def session(ctx, fmt):
    """A daemon in that format, taken through the same events; returns its log text."""
    extra = ["--log-format", fmt] if fmt != "env-json" else []
    env = {"IMDSD_LOG_FORMAT": "json"} if fmt == "env-json" else None
    tenant = ctx.tenant("ok")
    d = ctx.daemon(tenant, extra=extra, env=env)
    assert get_token(d.port).status == 200
    for path in HOSTILE:
        request(d.port, path, {"Metadata": "true"})
    raw_exchange(d.port, b"GET /metadata/identity/oauth2/token?resource=x HTTP/1.1\r\nHost: evil\"host\\x\r\n"
                         b"Metadata: true\r\n\r\n", timeout=2, one_response=True)
    raw_exchange(d.port, b"GARBAGE \xff\x00\r\n\r\n", timeout=2, one_response=True)
    ctx.fake.control(tenant, script=["aadsts-700016"])   # Entra's error text ends up in the log
    assert get_token(d.port, resource="https://graph.microsoft.com").status == 400
    d.token.rotate()
    wait_for(lambda: d.log().count("token_file_loaded") == 2, 5, "the rotation in the log")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "token_file_reload" in d.log(), 5, "SIGHUP's reload in the log")
    d.stop()
    return d.log()


def test_json_log_lines_parse_and_match_logfmt(ctx):
    text = session(ctx, "logfmt")
    for fmt in ("json", "env-json"):
        jtext = session(ctx, fmt)
        lines = jtext.splitlines()
        assert len(lines) > 15, jtext
        recs = []
        for line in lines:
            line.encode("ascii")          # printable ASCII only: valid UTF-8 whatever the input was
            rec = json.loads(line)
            assert isinstance(rec, dict) and list(rec)[:3] == ["ts", "level", "event"], line
            recs.append(rec)
        # the same events with the same keys as the logfmt run
        def shape(events):
            return collections.Counter((e["event"], tuple(sorted(k for k in e if k != "_line"))) for e in events)
        assert shape(recs) == shape(log_events(text)), (shape(recs) - shape(log_events(text)),
                                                        shape(log_events(text)) - shape(recs))
        # hostile input stayed inside its own value: no field was forged, nothing was split
        assert not any(r.get("forged") or r["event"] == "x" for r in recs)
        refused = [r for r in recs if r["event"] == "request_host_refused"]
        assert refused and refused[0]["host"] == 'evil"host\\x', refused
        errors = [r for r in recs if r["event"] == "entra_error"]
        assert errors and errors[0]["aadsts"] == 700016 and isinstance(errors[0]["http_status"], int), errors


def test_log_format_setting_errors(ctx):
    for args, env, want in ((["--log-format", "yaml"], None, "--log-format: invalid value 'yaml' (logfmt or json)"),
                            ([], {"IMDSD_LOG_FORMAT": "JSONL"}, "IMDSD_LOG_FORMAT: invalid value 'JSONL'")):
        rc, out, err = ctx.run(ctx.daemon_args(ctx.tenant(), ctx.token(), harness.free_port()) + args, env=env)
        assert rc == 2 and want in err and err.count("\n") == 1, (rc, err)
    # a start-up failure after the configuration is read is a JSON line too
    rc, _, err = ctx.run(ctx.daemon_args(ctx.tenant(), ctx.token(), 1) + ["--log-format", "json", "--listen",
                                                                             "192.0.2.1:80"])
    assert rc == 1, err
    rec = json.loads(err.strip().splitlines()[-1])
    assert rec["event"] == "fatal" and rec["level"] == "error" and "cannot listen on 192.0.2.1:80" in rec["error"], rec
