"""Command line, environment, listeners and log format."""
import http.client
import os
import re
import socket

from harness import (CLIENT_ID, HERE, Skip, assert_token_ok, free_port, get_token, request)

VERSION = open(os.path.join(HERE, "..", "..", "VERSION")).read().strip()
LOG_LINE = re.compile(r"^ts=\S+ level=(debug|info|warn|error) event=[A-Za-z0-9_.:-]+( .*)?$")


def good_args(ctx):
    tok = ctx.token()
    return ctx.daemon_args(ctx.tenant("ok"), tok, free_port())


def replace(args, flag, value):
    """args with flag's value set to value (appended if absent), or flag removed when value is None."""
    args = list(args)
    if flag not in args:
        return args if value is None else args + [flag, value]
    i = args.index(flag)
    if value is None:
        del args[i:i + 2]
    else:
        args[i + 1] = value
    return args


def expect_usage_error(ctx, args, setting, value, env=None):
    rc, out, err = ctx.run(args, env)
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2, f"exit status {rc}, want 2 (stderr: {err.strip()[:300]!r})"
    assert len(lines) == 1, f"want exactly one line on stderr, got {len(lines)}: {lines[:5]}"
    assert re.search(setting, lines[0], re.I), f"{lines[0]!r} does not name the setting /{setting}/"
    if value is not None:
        assert value in lines[0], f"{lines[0]!r} does not show the value {value!r}"


def test_help_and_version(ctx):
    rc, out, err = ctx.run(["--help"])
    assert rc == 0, f"--help exited {rc}"
    for flag in ("--listen", "--client-id", "--tenant-id", "--token-file", "--authority-host", "--ca-file"):
        assert flag in out + err, f"--help does not mention {flag}"
    rc, out, err = ctx.run(["--version"])
    assert rc == 0 and VERSION in out + err, f"--version: rc={rc} {out + err!r}, want {VERSION}"


def test_missing_settings_exit_2(ctx):
    args = good_args(ctx)
    expect_usage_error(ctx, replace(args, "--client-id", None), r"client[-_ ]?id", None)
    expect_usage_error(ctx, replace(args, "--tenant-id", None), r"tenant", None)
    expect_usage_error(ctx, replace(args, "--token-file", None), r"token[-_ ]?file", None)
    expect_usage_error(ctx, replace(args, "--client-id", None), r"client[-_ ]?id", None, {"AZURE_CLIENT_ID": ""})


def test_malformed_settings_exit_2(ctx):
    args = good_args(ctx)
    notpem = os.path.join(ctx.tmp, "not-a-cert.pem")
    with open(notpem, "w") as f:
        f.write("hello\n")
    cases = [("--authority-host", "http://x", r"authority"),
             ("--authority-host", "ftp://login.example/", r"authority"),
             ("--listen", "nonsense", r"listen"),
             ("--listen", "127.0.0.1:99999", r"listen"),
             ("--listen", "256.1.1.1:80", r"listen"),
             ("--ca-file", "/nonexistent/ca.pem", r"ca[-_ ]?file"),
             ("--ca-file", notpem, r"ca[-_ ]?file"),
             ("--log-level", "loud", r"log[-_ ]?level"),
             ("--max-connections", "abc", r"max[-_ ]?connections"),
             ("--idle-timeout", "5x", r"idle[-_ ]?timeout"),
             ("--entra-timeout", "soon", r"entra[-_ ]?timeout")]
    for flag, value, setting in cases:
        expect_usage_error(ctx, replace(args, flag, value), setting, value)
    expect_usage_error(ctx, args + ["--bogus-flag"], r"bogus", "--bogus-flag")
    env_args = replace(args, "--authority-host", None)
    expect_usage_error(ctx, env_args, r"authority", "http://login.example/",
                       {"AZURE_AUTHORITY_HOST": "http://login.example/"})


def test_configured_by_environment(ctx):
    tenant, tok, port = ctx.tenant("ok"), ctx.token(), free_port()
    env = {"AZURE_CLIENT_ID": CLIENT_ID, "AZURE_TENANT_ID": tenant, "AZURE_FEDERATED_TOKEN_FILE": tok.path,
           "AZURE_AUTHORITY_HOST": f"https://localhost:{ctx.fake.port}",      # no trailing slash
           "IMDSD_CA_FILE": ctx.certs["ca.pem"], "IMDSD_LOG_LEVEL": "debug"}
    d = ctx.daemon(tenant, tok, args=["--listen", f"127.0.0.1:{port}"], env=env, port=port)
    assert_token_ok(get_token(d.port))
    rec = ctx.fake.records(tenant)
    assert len(rec) == 1 and rec[0]["client_id"] == CLIENT_ID and rec[0]["assertion_sha256"] == tok.sha256


def test_flags_override_environment(ctx):
    tenant, tok, port = ctx.tenant("ok"), ctx.token(), free_port()
    env = {"AZURE_CLIENT_ID": "env-client-id", "AZURE_TENANT_ID": ctx.tenant("aadsts-90002"),
           "AZURE_FEDERATED_TOKEN_FILE": os.path.join(ctx.tmp, "nonexistent-token"),
           "AZURE_AUTHORITY_HOST": f"https://localhost:{ctx.fake_rogue.port}/",
           "IMDSD_CA_FILE": ctx.certs["rogue-ca.pem"], "IMDSD_LOG_LEVEL": "error"}
    d = ctx.daemon(tenant, tok, env=env, port=port)
    assert_token_ok(get_token(d.port))
    rec = ctx.fake.records(tenant)
    assert len(rec) == 1 and rec[0]["client_id"] == CLIENT_ID, rec
    assert "level=debug" in d.log(), "--log-level debug did not override IMDSD_LOG_LEVEL=error"


def test_authority_host_without_trailing_slash(ctx):
    tenant, tok, port = ctx.tenant("ok"), ctx.token(), free_port()
    args = ctx.daemon_args(tenant, tok, port)
    args[args.index("--authority-host") + 1] = f"https://localhost:{ctx.fake.port}"
    d = ctx.daemon(tenant, tok, args=args, port=port)
    assert_token_ok(get_token(d.port))
    assert ctx.fake.calls(tenant) == 1


def test_listen_ipv4_and_ipv6(ctx):
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        raise Skip("no IPv6 loopback")
    tenant, tok, p4, p6 = ctx.tenant("ok"), ctx.token(), free_port(), free_port(socket.AF_INET6, "::1")
    args = ctx.daemon_args(tenant, tok, p4, extra=["--listen", f"[::1]:{p6}"])
    ctx.daemon(tenant, tok, args=args, port=p4)
    r6 = request(p6, "/healthz", host="::1")
    assert r6.status == 200, r6
    a = assert_token_ok(get_token(p4))
    c = http.client.HTTPConnection("::1", p6, timeout=10 * ctx.scale)
    try:
        b = assert_token_ok(get_token(p6, conn=c))
    finally:
        c.close()
    assert a["access_token"] == b["access_token"] and ctx.fake.calls(tenant) == 1, "listeners do not share a cache"


def test_default_listen_port_8000(ctx):
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 8000))
    except OSError:
        raise Skip("127.0.0.1:8000 is in use")
    tenant, tok = ctx.tenant("ok"), ctx.token()
    args = ctx.daemon_args(tenant, tok, 0)
    del args[0:2]                                             # no --listen
    d = ctx.daemon(tenant, tok, args=args, port=8000)
    assert request(8000, "/healthz").status == 200


def test_log_lines_are_key_value(ctx):
    d = ctx.daemon()
    assert_token_ok(get_token(d.port))
    get_token(d.port, headers={})
    get_token(d.port, client_id="nobody")
    request(d.port, "/nowhere")
    d.stop()
    lines = [l for l in d.log().splitlines() if l.strip()]
    assert lines, "the daemon logged nothing at --log-level debug"
    bad = [l for l in lines if not LOG_LINE.match(l)]
    assert not bad, f"{len(bad)} log lines not 'ts=.. level=.. event=..', e.g. {bad[:3]}"


def test_log_level_error_is_quiet(ctx):
    d = ctx.daemon(log_level="error")
    assert_token_ok(get_token(d.port))
    get_token(d.port, headers={})
    d.stop()
    noisy = [l for l in d.log().splitlines() if "level=info" in l or "level=debug" in l]
    assert not noisy, f"--log-level error still logs: {noisy[:3]}"
