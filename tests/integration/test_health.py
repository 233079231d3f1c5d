"""The health listener (--health-listen): probes that the kubelet can reach on the pod IP, and never
a token there. The kubelet's httpGet probes connect to the pod IP, not to 127.0.0.1, so the token
listener stays on loopback and the probes get a listener of their own."""
import os
import re
import socket
import threading
import time

import harness
from harness import (assert_json_error, assert_token_ok, free_port, get_token, log_events, make_jwt, request,
                     token_url, wait_for)

SECRET = "health-listener-secret"


def token_paths(secret):
    """Every way to ask for a token, each with what that protocol needs."""
    md = {"Metadata": "true"}
    return [(token_url(), md),
            (token_url(path="//Metadata/Identity/OAuth2/Token/"), md),
            ("/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fvault.azure.net", {"X-IDENTITY-HEADER": secret}),
            ("/MSI/token/?api-version=2019-08-01&resource=https%3A%2F%2Fvault.azure.net", {"X-IDENTITY-HEADER": secret})]


def test_health_listener_serves_probes_and_never_a_token(ctx):
    secret = os.path.join(ctx.tmp, "identity-header")
    with open(secret, "w") as f:
        f.write(SECRET)
    hp = free_port()
    d = ctx.daemon(extra=["--health-listen", f"127.0.0.1:{hp}", "--identity-header-file", secret])
    assert request(hp, "/healthz").json == {"status": "ok"}
    r = request(hp, "/readyz")
    assert r.status == 200 and r.json["status"] == "ready", r
    for path, headers in token_paths(SECRET):
        r = request(hp, path, headers)
        assert_json_error(r, 404, "not_found")
    assert request(hp, "/metadata/instance?api-version=2021-02-01", {"Metadata": "true"}).status == 404
    assert ctx.fake.calls(d.tenant) == 0, "a token was asked for through the health listener"
    # the token listener is unchanged: tokens and probes
    assert_token_ok(get_token(d.port))
    r = request(d.port, "/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fvault.azure.net",
                {"X-IDENTITY-HEADER": SECRET})
    assert r.status == 200 and r.json["access_token"], r
    assert request(d.port, "/readyz").status == 200
    # even with a token cached, the health listener answers 404 and nothing else
    r = request(hp, token_url(), {"Metadata": "true"})
    assert_json_error(r, 404, "not_found")
    assert b"access_token" not in r.body
    # /readyz there follows the token file like everywhere
    d.token.rotate(make_jwt(lifetime=-60))
    wait_for(lambda: request(hp, "/readyz").status == 503, 5, "/readyz on the health listener to say 503")
    assert request(hp, "/readyz").json["token_file"]["state"] == "expired"
    events = {(e["addr"], e["serves"]) for e in log_events(d.log(), "listening")}
    assert events == {(f"127.0.0.1:{d.port}", "tokens"), (f"127.0.0.1:{hp}", "health")}, events


def test_health_listener_on_the_pod_ip(ctx):
    """A network namespace stands for the pod, 10.244.1.17 for its IP. imdsd serves tokens on
    127.0.0.1:8000 and probes on 0.0.0.0:8001: the kubelet's view (the pod IP) reaches the probes,
    gets 404 for any token path, and cannot connect to the token port at all."""
    ns, d, fake = ctx.netns_daemon("127.0.0.1", 8000, addresses=["10.244.1.17/32"],
                                   extra=["--health-listen", "0.0.0.0:8001"])
    pod_ip = "10.244.1.17"
    assert request(8001, "/healthz", host=pod_ip, netns=ns).status == 200
    r = request(8001, "/readyz", host=pod_ip, netns=ns)
    assert r.status == 200 and r.json["status"] == "ready", r
    for path, headers in token_paths(SECRET):
        assert_json_error(request(8001, path, headers, host=pod_ip, netns=ns), 404, "not_found")

    def connect_token_port():
        try:
            socket.create_connection((pod_ip, 8000), timeout=2).close()
            return "connected"
        except ConnectionRefusedError:
            return "refused"
    assert harness.in_netns(ns, connect_token_port) == "refused", "the token port answers on the pod IP"
    assert_token_ok(request(8000, token_url(), {"Metadata": "true"}, netns=ns))
    assert len(fake.records(d.tenant)) == 1


def test_exec_probe(ctx):
    """imdsd --probe IP:PORT[/PATH]: the exec probe for an image without a shell or curl. Exit 0 on 200
    and silent; otherwise exit 1 with one line that says why, within its 2 s deadline."""
    hp = free_port()
    missing = harness.KubeletToken(os.path.join(ctx.tmp, "late-token"), create=False)
    d = ctx.daemon(token=missing, extra=["--health-listen", f"127.0.0.1:{hp}"])
    for target in (f"127.0.0.1:{hp}", f"127.0.0.1:{hp}/healthz", f"127.0.0.1:{d.port}/healthz"):
        rc, out, err = ctx.run(["--probe", target])
        if target.endswith("/healthz"):
            assert (rc, out, err) == (0, "", ""), (target, rc, err)
        else:   # no token file yet: not ready
            assert rc == 1 and re.fullmatch(rf"imdsd: --probe: 127\.0\.0\.1:{hp}/readyz answered 503: "
                                            r"token file (does not exist|not read yet)\n", err), err
    missing.rotate(make_jwt())
    wait_for(lambda: ctx.run(["--probe", f"127.0.0.1:{d.port}/readyz"])[0] == 0, 5, "--probe of /readyz to pass")
    rc, _, err = ctx.run(["--probe", f"127.0.0.1:{hp}/metadata/identity/oauth2/token"])
    assert rc == 1 and err.endswith("answered 404: The requested path was not found\n"), err
    # nothing listening; a listener that never answers; something that is not HTTP
    rc, _, err = ctx.run(["--probe", f"127.0.0.1:{free_port()}"])
    assert rc == 1 and "Connection refused" in err and err.count("\n") == 1, err
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(4)
    t0 = time.monotonic()
    rc, _, err = ctx.run(["--probe", f"127.0.0.1:{mute.getsockname()[1]}"])
    assert rc == 1 and "no answer within 2000 ms" in err, err
    assert 1.9 < time.monotonic() - t0 < 2.5 * ctx.scale + 1
    talk = socket.socket()
    talk.bind(("127.0.0.1", 0))
    talk.listen(4)

    def garbage():
        c, _ = talk.accept()
        c.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        c.close()
    t = threading.Thread(target=garbage)
    t.start()
    rc, _, err = ctx.run(["--probe", f"127.0.0.1:{talk.getsockname()[1]}"])
    t.join()
    mute.close()
    talk.close()
    assert rc == 1 and "not an HTTP answer" in err, err
