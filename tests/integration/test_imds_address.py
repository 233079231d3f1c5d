"""The IMDS-address option (container/kubernetes/deployment-imds-address.yaml) with the privileges it
has in a pod: `imdsd --add-loopback-address 169.254.169.254` holding CAP_NET_ADMIN alone (the init
container), the pod sysctl net.ipv4.ip_unprivileged_port_start=80, and the sidecar as uid 65532 with
no capability at all. Clients use http://169.254.169.254 with no environment override: curl here,
the Python and JavaScript SDKs in test_sdk_python.py / test_sdk_js.py (their *_imds_probe_in_netns
tests run on the same set-up)."""
import json
import os
import subprocess

import harness
from harness import CLIENT_ID, RESOURCE, TOKEN_PATH, only_cap_prefix, run_once, unprivileged_prefix

CURL = "/usr/bin/curl"
URL = f"http://169.254.169.254{TOKEN_PATH}?api-version=2018-02-01&resource={RESOURCE}"


def lo_addresses(ns):
    return [a["local"] for i in json.loads(ns.ip("-j", "addr", "show", "dev", "lo")) for a in i["addr_info"]]


def test_init_mode_needs_net_admin_and_nothing_else(ctx):
    ns = ctx.netns()
    vgdir = os.path.join(ctx.tmp, "vg-nobody")   # valgrind's log, written as uid 65532
    os.makedirs(vgdir, mode=0o777)
    os.chmod(vgdir, 0o777)
    # no capability (the sidecar's own privileges): refused, with the capability named, nothing added
    rc, _, err = run_once(["--add-loopback-address", "169.254.169.254"], prefix=ns.prefix() + unprivileged_prefix(),
                          vgdir=vgdir)
    assert rc == 1 and "needs CAP_NET_ADMIN" in err and err.count("\n") == 1, (rc, err)
    assert "169.254.169.254" not in lo_addresses(ns)
    # CAP_NET_ADMIN alone: added; a second run (a restarted init container) finds it and succeeds
    for want in ("result=added", "result=already_present"):
        rc, _, err = run_once(["--add-loopback-address", "169.254.169.254"],
                              prefix=ns.prefix() + only_cap_prefix("net_admin"), vgdir=ctx.tmp)
        assert rc == 0 and want in err, (rc, err)
    assert lo_addresses(ns).count("169.254.169.254") == 1, lo_addresses(ns)
    out = ns.ip("addr", "show", "dev", "lo")
    assert "inet 169.254.169.254/32" in out, out
    # a bad address: one line naming the setting and the value, exit 2, nothing changed
    rc, _, err = run_once(["--add-loopback-address", "169.254.169.254/24"], vgdir=ctx.tmp)
    assert rc == 2 and err == "imdsd: --add-loopback-address: '169.254.169.254/24' is not an IPv4 address\n", err


def curl(ns, *args):
    p = subprocess.run(ns.prefix() + [CURL, "-sS", "--max-time", "10", "-w", "\n%{http_code}"] + list(args),
                       capture_output=True, text=True)
    assert p.returncode == 0, f"curl: {p.stderr.strip()}"
    body, _, code = p.stdout.rpartition("\n")
    return int(code), json.loads(body)


def test_curl_gets_a_token_at_the_imds_address_from_an_unprivileged_sidecar(ctx):
    ns, d, fake = ctx.netns_daemon("169.254.169.254", 80, imds_address=True)
    # the sidecar: uid and gid 65532, no capability of any kind
    status = open(f"/proc/{d.pid}/status").read() if not harness.VALGRIND else ""
    if status:
        fields = dict(line.split(":", 1) for line in status.splitlines())
        assert fields["Uid"].split()[:2] == ["65532", "65532"], fields["Uid"]
        for cap in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
            assert int(fields[cap], 16) == 0, f"{cap} {fields[cap].strip()}"
        assert fields["NoNewPrivs"].strip() == "1"
    code, body = curl(ns, "-H", "Metadata: true", URL)
    issued = {r["access_token"] for r in fake.records(d.tenant) if r.get("access_token")}
    assert code == 200 and body["access_token"] in issued and body["client_id"] == CLIENT_ID, (code, body.keys())
    # what an SDK's availability probe sends (no Metadata header): an immediate 400
    code, body = curl(ns, URL)
    assert code == 400 and body["error"] == "invalid_request", (code, body)
    # the address answers only inside the pod's namespace: outside it, nothing listens there
    p = subprocess.run([CURL, "-sS", "--max-time", "2", "-H", "Metadata: true", URL], capture_output=True, text=True)
    assert p.returncode != 0 or '"access_token"' not in p.stdout, "a token outside the namespace"
