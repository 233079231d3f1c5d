"""imdsd in the place of the workload-identity webhook's proxy sidecar (webhook v1.6.0), as the webhook
injects it when its PROXY_IMAGE names imdsd's image:
- the sidecar: exactly the webhook's arguments (`--proxy-port=N --log-level=L`, pkg/webhook/webhook.go,
  injectProxySidecarContainer), its AZURE_* variables and token file, the image's user 65532 with no
  capability;
- its postStart hook: `/proxy --proxy-port=N --probe --log-level=L`, which must not return before the
  sidecar serves (here the image's /proxy is imdsd itself: the link is checked in test_image.py);
- the init container's NAT rules (init/init-iptables.sh): TCP to 169.254.169.254:80 is redirected to
  port N, except from uid 1501, the proxy image's user.
In a network namespace that stands for the pod (an "eth0" with a default route, as a pod has),
clients with no endpoint variable at all (curl, the Python and JavaScript SDKs, and go-autorest's
adal, which knows no other address) reach 169.254.169.254 and get their tokens from imdsd through
the redirect. The one addition to the webhook's environment is IMDSD_CA_FILE, the stand-in Entra's
test CA (in a cluster the image's CA bundle trusts Entra)."""
import json
import os
import subprocess
import sys
import time

import harness
from harness import CLIENT_ID, RESOURCE, TOKEN_PATH, Fake, free_port, log_events

sys.path.insert(0, os.path.join(harness.HERE, "..", "compat"))
import sdk_clients as sdk  # noqa: E402
from sdk_clients import ARM, GRAPH, VAULT  # noqa: E402

CURL = "/usr/bin/curl"
IPTABLES = "/usr/sbin/iptables"
PROXY_UID = 1501     # init-iptables.sh: PROXY_UID, the proxy image's user, never redirected
WEBHOOK_ARGS = ["--proxy-port={port}", "--log-level=info"]
POST_START = ["--proxy-port={port}", "--probe", "--log-level=info"]


def webhook_env(ctx, tenant, tok, fake):
    """What the webhook gives every container of an annotated pod, and the test CA."""
    return {"AZURE_CLIENT_ID": CLIENT_ID, "AZURE_TENANT_ID": tenant, "AZURE_FEDERATED_TOKEN_FILE": tok.path,
            "AZURE_AUTHORITY_HOST": f"https://localhost:{fake.port}/", "IMDSD_CA_FILE": ctx.certs["ca.pem"]}


def fill(argv, port):
    return [a.format(port=port) for a in argv]


def start_probe(ctx, port, prefix=()):
    """The postStart hook, as the kubelet runs it: in the background, its stdout and stderr kept."""
    out = os.path.join(ctx.tmp, f"probe-{harness.unique()}.txt")
    f = open(out, "w")
    p = subprocess.Popen(list(prefix) + harness.command(fill(POST_START, port), ctx.tmp), stdin=subprocess.DEVNULL,
                         stdout=f, stderr=subprocess.STDOUT, env=harness.base_env())
    f.close()
    ctx.cleanups.append(lambda: p.poll() is None and p.kill())
    return p, out


def test_poststart_probe_waits_until_the_sidecar_serves(ctx):
    """The hook starts before the sidecar listens (the kubelet runs them at once): it keeps trying,
    then exits 0, silent, once imdsd is ready; with the token file missing it gives up after 10 s
    and says why in one line (the kubelet shows it in the FailedPostStartHook event)."""
    port = free_port()
    probe, out = start_probe(ctx, port)
    time.sleep(0.5)
    assert probe.poll() is None, f"the hook returned before anything listened: {open(out).read()!r}"
    tenant, tok = ctx.tenant("ok"), ctx.token()
    t0 = time.monotonic()
    d = ctx.daemon(tenant, tok, args=fill(WEBHOOK_ARGS, port), env=webhook_env(ctx, tenant, tok, ctx.fake),
                   port=port)
    assert probe.wait(10 * ctx.scale) == 0, open(out).read()
    assert open(out).read() == ""
    assert time.monotonic() - t0 < 3 * ctx.scale
    assert any(e.get("addr") == f"127.0.0.1:{port}" for e in log_events(d.log(), "listening")), d.log()[-800:]
    harness.assert_token_ok(harness.get_token(port))
    # no token file yet: the hook fails, naming the reason
    port2 = free_port()
    missing = harness.KubeletToken(os.path.join(ctx.tmp, "not-yet"), create=False)
    ctx.daemon(tenant, missing, args=fill(WEBHOOK_ARGS, port2),
               env=webhook_env(ctx, tenant, missing, ctx.fake), port=port2)
    t0 = time.monotonic()
    probe, out = start_probe(ctx, port2)
    assert probe.wait(20 * ctx.scale) == 1
    took = time.monotonic() - t0
    text = open(out).read()
    assert text == f"imdsd: --probe: 127.0.0.1:{port2}/readyz answered 503: token file does not exist " \
                   "(retried for 10 s)\n", text
    assert 9.5 < took < 10 + 5 * ctx.scale, took


test_poststart_probe_waits_until_the_sidecar_serves.timeout = 60


def pod_netns(ctx, port):
    """A namespace like an annotated pod's after the init container ran: a default route (through a
    veth eth0) and init-iptables.sh's rules, written out here from that script."""
    ns = ctx.netns()
    ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "cni0")   # as a CNI plugin makes it
    ns.ip("addr", "add", "10.244.0.7/24", "dev", "eth0")
    for dev in ("eth0", "cni0"):
        ns.ip("link", "set", dev, "up")
    ns.ip("route", "add", "default", "via", "10.244.0.1")
    for rule in (["-N", "AZWI_PROXY_OUTPUT"], ["-N", "AZWI_PROXY_REDIRECT"],
                 ["-A", "AZWI_PROXY_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-port", str(port)],
                 ["-A", "OUTPUT", "-p", "tcp", "-d", "169.254.169.254", "--dport", "80", "-j", "AZWI_PROXY_OUTPUT"],
                 ["-A", "AZWI_PROXY_OUTPUT", "-m", "owner", "--uid-owner", str(PROXY_UID), "-j", "ACCEPT"],
                 ["-A", "AZWI_PROXY_OUTPUT", "-j", "AZWI_PROXY_REDIRECT"]):
        p = subprocess.run(ns.prefix() + [IPTABLES, "-t", "nat"] + rule, capture_output=True, text=True)
        if p.returncode != 0 and "can't initialize" in p.stderr.lower():
            raise harness.Skip(f"iptables cannot use the nat table here: {p.stderr.strip()}")
        assert p.returncode == 0, f"iptables -t nat {' '.join(rule)}: {p.stderr.strip()}"
    return ns


def curl(ns, path, prefix=()):
    p = subprocess.run(ns.prefix() + list(prefix) + [CURL, "-sS", "--max-time", "3", "-H", "Metadata: true",
                                                     "-w", "\n%{http_code}", f"http://169.254.169.254{path}"],
                       capture_output=True, text=True)
    body, _, code = p.stdout.rpartition("\n")
    return p.returncode, code, body, p.stderr


def test_webhook_pod_gets_tokens_through_the_redirect(ctx):
    port = 8000   # the webhook's default (annotation azure.workload.identity/proxy-sidecar-port)
    ns = pod_netns(ctx, port)
    tok, tenant = ctx.token(), ctx.tenant("ok")
    fake = Fake(ctx.tmp, f"dropin-{harness.unique()}", ctx.certs["leaf.pem"], ctx.certs["leaf.key"], netns=ns,
                token_file=tok.path)
    ctx.cleanups.append(fake.stop)
    probe, out = start_probe(ctx, port, prefix=ns.prefix())
    d = ctx.daemon(tenant, tok, args=fill(WEBHOOK_ARGS, port), env=webhook_env(ctx, tenant, tok, fake), fake=fake,
                   port=port, netns=ns, unprivileged=True)
    assert probe.wait(10 * ctx.scale) == 0, open(out).read()
    # curl, knowing only the IMDS address; the answer is imdsd's, with a token from the stand-in Entra
    rc, code, body, err = curl(ns, f"{TOKEN_PATH}?api-version=2018-02-01&resource={RESOURCE}")
    assert rc == 0 and code == "200", (rc, code, body, err)
    assert json.loads(body)["access_token"] in sdk.fake_issued(ctx, tenant, fake)
    # the paths the proxy forwarded to the node's IMDS: a JSON 404 at once (region discovery, MI v2)
    for path in ("/metadata/instance/compute?api-version=2021-02-01&format=json",
                 "/metadata/identity/getplatformmetadata?cred-api-version=2.0",
                 "/metadata/identity/issuecredential?cred-api-version=2.0"):
        t0 = time.monotonic()
        rc, code, body, err = curl(ns, path)
        assert rc == 0 and code == "404", (path, rc, code, body, err)
        j = json.loads(body)
        assert j["error"] == "not_found" and "only managed identity tokens" in j["error_description"], j
        assert time.monotonic() - t0 < 1, path
    # the SDKs, with no endpoint variable at all
    env = sdk.client_env(ctx)
    for kind in ("ManagedIdentityCredential", "DefaultAzureCredential"):
        sdk.check_tokens(ctx, tenant, sdk.run_py(ctx, kind, [ARM, VAULT], env, netns=ns), CLIENT_ID, fake=fake)
    sdk.check_tokens(ctx, tenant, sdk.run_js(ctx, "ManagedIdentityCredential", [ARM, GRAPH], env, netns=ns),
                     CLIENT_ID, fake=fake)
    sdk.check_tokens(ctx, tenant, sdk.run_go(ctx, [ARM, "https://storage.azure.com/.default"], env, netns=ns),
                     CLIENT_ID, fake=fake)
    # uid 1501's traffic is not redirected (the rule's exception for the proxy's own user): nothing
    # answers it, so no client of that uid reaches imdsd by the IMDS address
    rc, code, body, err = curl(ns, f"{TOKEN_PATH}?api-version=2018-02-01&resource={RESOURCE}",
                               prefix=harness.unprivileged_prefix(PROXY_UID))
    assert rc != 0 and code == "000", (rc, code, body, err)
    assert d.alive()


test_webhook_pod_gets_tokens_through_the_redirect.timeout = 120


def msal_region(ctx, ns):
    """MSAL for Python's own region discovery (msal.region._detect_region, what a
    ConfidentialClientApplication(azure_region=True) runs) inside ns: (region, milliseconds)."""
    code = ("import json, time, msal.region, requests\n"
            "t0 = time.monotonic()\n"
            "region = msal.region._detect_region(requests.Session())\n"
            "print(json.dumps({'region': region, 'ms': (time.monotonic() - t0) * 1000}))\n")
    p = subprocess.run(ns.prefix() + ["/usr/bin/python3", "-c", code], capture_output=True, text=True,
                       timeout=30, env=sdk.client_env(ctx))
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return r["region"], r["ms"]



def test_region_discovery_falls_through_at_once(ctx):
    """MSAL's region discovery (what ConfidentialClientApplication(azure_region=True) and
    AZURE_REGIONAL_AUTHORITY_NAME run) through the redirect: imdsd's 404 comes at once, and MSAL
    for Python 1.21 (Debian 12's, which takes any body of /metadata/instance/compute/location?
    format=text for the region, whatever the status) finds no region and keeps the global authority.
    With the JSON 404 the other paths get, it took the JSON text for a region name."""
    port = 8000
    ns = pod_netns(ctx, port)
    tok, tenant = ctx.token(), ctx.tenant("ok")
    fake = Fake(ctx.tmp, f"region-{harness.unique()}", ctx.certs["leaf.pem"], ctx.certs["leaf.key"], netns=ns,
                token_file=tok.path)
    ctx.cleanups.append(fake.stop)
    d = ctx.daemon(tenant, tok, args=fill(WEBHOOK_ARGS, port), env=webhook_env(ctx, tenant, tok, fake), fake=fake,
                   port=port, netns=ns, unprivileged=True)
    region, ms = msal_region(ctx, ns)
    with open(os.path.join(ctx.tmp, "region-discovery.txt"), "w") as f:
        f.write(f"MSAL for Python region discovery through imdsd: {ms:.1f} ms, region {region!r}\n")
    assert region == "", f"MSAL took {region!r} for its region"
    assert ms < 1000 * ctx.scale, f"region discovery took {ms:.0f} ms"
    # the same question for JSON still gets the JSON 404 that says why
    rc, code, body, err = curl(ns, "/metadata/instance/compute/location?api-version=2021-01-01")
    assert code == "404" and "only managed identity tokens" in json.loads(body)["error_description"], body
    rc, code, body, err = curl(ns, "/metadata/instance/compute/location?format=text&api-version=2021-01-01")
    assert code == "404" and body == "", (code, body)
    assert d.alive()
