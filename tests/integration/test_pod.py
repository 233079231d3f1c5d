"""The manifests in container/kubernetes/ run as pods with `podman kube play`: imdsd's image beside an
application container, the real Python and JavaScript SDKs in the pod's network namespace, the probes
from outside the pod as the kubelet makes them (to the pod IP), a kubelet-style token rotation seen
through the volume, uid 65532 and a read-only root.

imdsd's image is the one the README's pod quick start pushes: its `skopeo copy` of the archive, run
as written except that podman's store stands in for the registry; the manifests must name it.
Each pod is the manifest's pod template, changed only where podman 4.3 cannot model a kubelet (each
change is made by pod_from() and listed there): no native sidecars (imdsd becomes the first ordinary
container), probes run by this test instead of podman, no service-account token projection (a
kubelet-style hostPath volume instead) and no webhook (its variables and volume written in), pod
sysctls passed as podman's default_sysctls, the stand-in Entra at the pod network's gateway.
Native-sidecar ordering itself (the application starts after imdsd's startupProbe passes) is
Kubernetes' job; here the application retries until imdsd answers, and the test records when the
startup probe first passes."""
import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

import yaml

import harness
import podman
from harness import CLIENT_ID, wait_for

sys.path.insert(0, os.path.join(harness.HERE, "..", "compat"))
import sdk_clients as sdk  # noqa: E402
from sdk_clients import ARM, GRAPH, VAULT  # noqa: E402

ONLY_VARIANTS = ("plain",)   # the image carries its own (static) build
MANIFESTS = os.path.join(podman.ROOT, "container", "kubernetes")
APP_IMAGE = "localhost/imdsd-test-app:1"
ENTRA_NAME = "login.entra.test"
CA_PATH = "/etc/imdsd/ca.pem"
FIGURES = os.path.join(podman.ROOT, "build", "pod-figures.json")
MIC, DAC = "ManagedIdentityCredential", "DefaultAzureCredential"

# The test application: asks for a token every second where the SDKs would (the override if the
# manifest sets one, else the IMDS address) and prints only whether it got one. busybox nc, not
# wget: Debian's static busybox wget crashes on these machines.
APP_SCRIPT = r"""trap 'exit 0' TERM
hp=${AZURE_POD_IDENTITY_AUTHORITY_HOST:-http://169.254.169.254:80}
hp=${hp#http://}
host=${hp%%:*}
port=${hp##*:}
req="GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/ HTTP/1.1\r\nHost: $host\r\nMetadata: true\r\nConnection: close\r\n\r\n"
while :; do
  status=$(printf "$req" | /bin/busybox nc -w 5 "$host" "$port" 2>/dev/null | /bin/busybox head -n 1)
  case "$status" in *" 200 "*) echo 'app: token ok';; *) echo "app: no token (${status%?})";; esac
  /bin/busybox sleep 1 & wait $!
done
"""


def app_image(ctx):
    """A scratch image with busybox as the application (uid 65532): no base image can be pulled here."""
    if podman.run("image", "exists", APP_IMAGE, check=False).returncode == 0:
        return
    d = os.path.join(ctx.tmp, "app-image")
    os.makedirs(d)
    subprocess.run(["install", "-m", "0755", "/bin/busybox", os.path.join(d, "busybox")], check=True)
    with open(os.path.join(d, "Containerfile"), "w") as f:
        f.write('FROM scratch\nCOPY busybox /bin/busybox\nUSER 65532:65532\nENTRYPOINT ["/bin/busybox"]\n')
    podman.run("build", "--quiet", "--timestamp", "0", "--layers=false", "-t", APP_IMAGE, d)


def quick_start_push():
    """The README's pod quick start, followed literally up to the registry: its skopeo command copies
    the archive make image wrote, with the registry (docker://) swapped for podman's own store, the
    one registry a test can reach. The archive is an image index: the README copies it --all (every
    architecture to the registry); podman's store takes one image of it (skopeo 1.9 copies no group
    into containers-storage), so here --all is left out and skopeo picks this machine's platform.
    Returns the image it pushed (the manifests must name it)."""
    global _pushed
    if _pushed:
        return _pushed
    with open(os.path.join(podman.ROOT, "README.md")) as f:
        section = f.read().split("**In a pod**", 1)[1].split("**On a VM**", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1).splitlines()
    assert block[0] == "make image" and "kubectl apply -f container/kubernetes/deployment.yaml" in block, block
    argv = shlex.split(next(line for line in block if line.startswith("skopeo copy ")))
    assert argv[:3] == ["skopeo", "copy", "--all"], f"the quick start must push every architecture: {argv}"
    assert argv[3] == f"oci-archive:build/imdsd-{podman.VERSION}.oci.tar" and argv[4].startswith("docker://"), argv
    _pushed = argv[4][len("docker://"):]
    p = subprocess.run(argv[:2] + [argv[3], "containers-storage:" + _pushed], cwd=podman.ROOT, env=podman.ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"the quick start's skopeo copy: {p.stderr.strip()[-800:]}"
    return _pushed


_pushed = None


def deployment(manifest):
    with open(os.path.join(MANIFESTS, manifest)) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    return next(d for d in docs if d["kind"] == "Deployment")


def env_set(container, name, value):
    env = container.setdefault("env", [])
    for e in env:
        if e["name"] == name:
            e["value"] = value
            return
    env.append({"name": name, "value": value})


def pod_from(manifest, name, tenant, tok, fake_port, gateway, ca):
    """The manifest's pod template as a Pod podman can play. Returns (pod, probes of imdsd, sysctls)."""
    tmpl = copy.deepcopy(deployment(manifest)["spec"]["template"])
    spec = tmpl["spec"]
    inits = spec.pop("initContainers", [])
    # 1. native sidecars (restartPolicy: Always) become ordinary containers, first in the pod
    sidecars = [c for c in inits if c.get("restartPolicy") == "Always"]
    for c in sidecars:
        del c["restartPolicy"]
    inits = [c for c in inits if c not in sidecars]
    if inits:
        spec["initContainers"] = inits
    spec["containers"] = sidecars + spec["containers"]
    imdsd = next(c for c in sidecars if c["name"] == "imdsd")
    # 2. probes: podman 4.3 would run httpGet probes as curl inside the container (there is none);
    #    this test makes them from outside, to the pod IP, as the kubelet does
    probes = {k: imdsd.pop(k) for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in imdsd}
    # podman publishes containerPorts on the host (a kubelet does not): the pod IP is enough
    probes["ports"] = {p.get("name"): p["containerPort"] for p in imdsd.pop("ports", [])}
    # 3. images: imdsd's as the manifest names it, pushed there by the README's quick start; the
    #    application is busybox asking for tokens
    for c in inits + sidecars:
        assert c["image"] == quick_start_push(), f"{manifest}: {c['name']} runs {c['image']}, not the pushed image"
    app = next(c for c in spec["containers"] if c["name"] == "app")
    app["image"] = APP_IMAGE
    app["command"] = ["/bin/busybox", "sh", "-c", APP_SCRIPT]
    # 4. the token: a kubelet-style hostPath volume instead of the projection, with the webhook's
    #    variables and mount written in when the manifest relies on the webhook
    token_mount = "/var/run/secrets/azure/wi"
    if tmpl["metadata"].get("labels", {}).get("azure.workload.identity/use") == "true":
        imdsd.setdefault("volumeMounts", []).append(
            {"name": "azure-identity-token", "mountPath": token_mount, "readOnly": True})
        spec.setdefault("volumes", []).append({"name": "azure-identity-token"})
        env_set(imdsd, "AZURE_FEDERATED_TOKEN_FILE", f"{token_mount}/token/azure-identity-token")
    for v in spec["volumes"]:
        if v["name"] == "azure-identity-token":
            v.pop("projected", None)
            v["hostPath"] = {"path": tok.root, "type": "Directory"}
    # 5. the stand-in Entra, at the pod network's gateway, trusted through the test CA
    env_set(imdsd, "AZURE_CLIENT_ID", CLIENT_ID)
    env_set(imdsd, "AZURE_TENANT_ID", tenant)
    env_set(imdsd, "AZURE_AUTHORITY_HOST", f"https://{ENTRA_NAME}:{fake_port}/")
    env_set(imdsd, "IMDSD_CA_FILE", CA_PATH)
    imdsd.setdefault("volumeMounts", []).append({"name": "test-ca", "mountPath": CA_PATH, "readOnly": True})
    spec["volumes"].append({"name": "test-ca", "hostPath": {"path": ca, "type": "File"}})
    spec["hostAliases"] = [{"ip": gateway, "hostnames": [ENTRA_NAME]}]
    # 6. what only a cluster has: service accounts; pod sysctls go to podman's default_sysctls
    spec.pop("serviceAccountName", None)
    spec.pop("automountServiceAccountToken", None)
    sysctls = spec.get("securityContext", {}).pop("sysctls", [])
    annotations = dict(tmpl["metadata"].get("annotations", {}))
    if inits:
        # podman 4.3 without systemd waits 20 s for an init container's exit (its cleanup process
        # waits for kube play's lock), then fails to remove a "once" container it still thinks runs
        annotations["io.podman.annotations.init.container.type"] = "always"
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "labels": tmpl["metadata"].get("labels", {}), "annotations": annotations},
           "spec": spec}
    return pod, imdsd, probes, sysctls


class Pod:
    """A manifest played by podman; stop() (by ctx.finish) stops it and checks imdsd exited 0."""

    def __init__(self, ctx, manifest, build=None, sidecar="imdsd"):
        """build(manifest, name, tenant, tok, fake_port, gateway, ca) makes the pod (pod_from by
        default); sidecar is the name of imdsd's container in it."""
        app_image(ctx)
        self.sidecar = sidecar
        self.ctx = ctx
        self.name = f"imdsd-pod-{os.getpid()}-{harness.unique()}"
        self.tok = harness.KubeletToken(os.path.join(ctx.tmp, f"{self.name}-token"), nested=True)
        self.fake = harness.Fake(ctx.tmp, self.name, ctx.certs["leaf.pem"], ctx.certs["leaf.key"],
                                 token_file=self.tok.path, bind="0.0.0.0")
        ctx.cleanups.append(self.fake.stop)
        self.tenant = ctx.tenant("ok")
        self.fake.control(self.tenant, token_file=self.tok.path)
        podman.reap_stale()
        net = podman.kube_network()
        gateway = net["gateway"]
        pod, self.imdsd_spec, self.probes, sysctls = (build or pod_from)(
            manifest, self.name, self.tenant, self.tok, self.fake.port, gateway, ctx.certs["ca.pem"])
        self.yaml = os.path.join(ctx.tmp, f"{self.name}.yaml")
        with open(self.yaml, "w") as f:
            yaml.safe_dump(pod, f)
        # podman 4.3 ignores spec.securityContext.sysctls: the same values as its default_sysctls,
        # which it applies to the pod's network namespace
        conf = os.path.join(ctx.tmp, f"{self.name}.conf")
        with open(os.path.join(podman.ROOT, "container", "containers.conf")) as f:
            text = f.read()
        extra = json.dumps([f"{s['name']}={s['value']}" for s in sysctls])
        with open(conf, "w") as f:
            f.write(text.replace("[containers]\n", f"[containers]\ndefault_sysctls = {extra}\n", 1))
        self.env = dict(podman.ENV, CONTAINERS_CONF=conf)
        self.t0 = time.monotonic()
        p = subprocess.run(["podman", "kube", "play", self.yaml], env=self.env, capture_output=True, text=True,
                           timeout=120)
        ctx.cleanups.append(self.stop)
        assert p.returncode == 0, f"podman kube play: {p.stderr.strip()[-1500:]}"
        infra = podman.inspect("pod", self.name)["InfraContainerID"]
        info = podman.inspect("container", infra)
        self.ip = info["NetworkSettings"]["Networks"][net["name"]]["IPAddress"]
        # the pod's network namespace, named so that the harness and the SDK runners can enter it
        self.ns = harness.NetNS(f"{self.name}-net")
        subprocess.run([harness.IP, "netns", "attach", self.ns.name, str(info["State"]["Pid"])], check=True)
        ctx.cleanups.append(lambda: subprocess.run([harness.IP, "netns", "delete", self.ns.name]))

    def container(self, short):
        return podman.inspect("container", f"{self.name}-{short}")

    def logs(self, short):
        p = podman.run("logs", f"{self.name}-{short}", check=False)
        return p.stdout + p.stderr

    def probe_port(self, probe):
        port = probe["httpGet"]["port"]
        return self.probes["ports"][port] if isinstance(port, str) else port

    def probe(self, kind):
        """The manifest's probe, made as the kubelet makes it: an HTTP GET to the pod IP."""
        pr = self.probes[kind]
        try:
            return harness.request(self.probe_port(pr), pr["httpGet"]["path"], host=self.ip, timeout=1).status
        except OSError:
            return None

    def stop(self):
        try:
            podman.run("pod", "stop", "-t", "10", self.name)
            for short in (self.sidecar, "app"):   # kept with the test's artefacts
                with open(os.path.join(self.ctx.tmp, f"{self.name}-{short}.log"), "w") as f:
                    f.write(self.logs(short))
            ex = self.container(self.sidecar)["State"]["ExitCode"]
            assert ex == 0, f"imdsd exited {ex} when the pod stopped: {self.logs(self.sidecar)[-1500:]}"
        finally:
            podman.run("pod", "rm", "-f", self.name, check=False)


def start(ctx, manifest):
    pod = Pod(ctx, manifest)
    # the startup probe as the kubelet runs it: every periodSeconds until it passes
    period = pod.probes["startupProbe"].get("periodSeconds", 10)
    deadline = period * pod.probes["startupProbe"].get("failureThreshold", 3)
    t = time.monotonic()
    while pod.probe("startupProbe") != 200:
        assert time.monotonic() - t < deadline, f"startupProbe failed for {deadline} s: {pod.logs('imdsd')[-1500:]}"
        time.sleep(min(period, 0.05))
    pod.ready_s = time.monotonic() - pod.t0
    return pod


def check_pod_basics(pod):
    """Probes pass at the pod IP, tokens are not there, the application gets tokens, and each container
    runs as the manifest says: imdsd uid 65532 without capabilities on a read-only root."""
    assert pod.probe("readinessProbe") == 200 and pod.probe("livenessProbe") == 200
    health = pod.probe_port(pod.probes["livenessProbe"])
    md = {"Metadata": "true"}
    r = harness.request(health, harness.token_url(), md, host=pod.ip)
    assert r.status == 404, f"a token path on the probe port answered {r.status}"
    for port in (8000, 80):
        try:
            harness.request(port, harness.token_url(), md, host=pod.ip, timeout=2)
            raise AssertionError(f"the token listener is reachable at the pod IP, port {port}")
        except OSError:
            pass
    wait_for(lambda: "app: token ok" in pod.logs("app"), 15, f"a token in the application's log: "
             f"{pod.logs('app')[-300:]}")
    for short in ("imdsd", "app"):
        c = pod.container(short)
        assert c["HostConfig"]["ReadonlyRootfs"] is True, f"{short}: root file system writable"
    st = podman.proc_status(pod.container("imdsd")["State"]["Pid"])
    assert st["Uid"].split()[:2] == ["65532", "65532"] and st["Gid"].split()[:2] == ["65532", "65532"], st["Uid"]
    assert int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0, (st["CapEff"], st["CapBnd"])
    assert st["NoNewPrivs"] == "1"
    return st


def sdk_round(ctx, pod, env):
    """Python (MIC, DAC) and JavaScript (MIC) clients in the pod's network namespace get tokens."""
    for kind in (MIC, DAC):
        res = sdk.run_py(ctx, kind, [ARM, VAULT], env, netns=pod.ns)
        sdk.check_tokens(ctx, pod.tenant, res, CLIENT_ID, fake=pod.fake)
    res = sdk.run_js(ctx, MIC, [ARM, GRAPH], env, netns=pod.ns)
    sdk.check_tokens(ctx, pod.tenant, res, CLIENT_ID, fake=pod.fake)


def record(name, **figures):
    """Figures for the README and the closing note, in build/pod-figures.json."""
    try:
        with open(FIGURES) as f:
            allf = json.load(f)
    except (OSError, ValueError):
        allf = {}
    allf[name] = figures
    with open(FIGURES, "w") as f:
        json.dump(allf, f, indent=1, sort_keys=True)


def test_pod_native_sidecar_deployment(ctx):
    """deployment.yaml: the SDKs find imdsd through AZURE_POD_IDENTITY_AUTHORITY_HOST, as the
    manifest's application container sets it; a rotation of the token volume reaches imdsd."""
    podman.require_image()
    pod = start(ctx, "deployment.yaml")
    check_pod_basics(pod)
    app_env = {e["name"]: e["value"] for e in deployment("deployment.yaml")["spec"]["template"]["spec"]
               ["containers"][0].get("env", [])}
    sdk_round(ctx, pod, sdk.client_env(ctx, **app_env))
    # the kubelet rotates the projected token: imdsd's next exchange sends the new one
    pod.tok.rotate()
    fp = pod.tok.rotations[-1]["fp"]
    wait_for(lambda: any(e.get("fp") == fp for e in harness.log_events(pod.logs("imdsd"), "token_file_loaded")),
             10, "the rotated token in imdsd's log")
    storage = "https://storage.azure.com/.default"   # not cached yet: a new exchange
    res = sdk.run_py(ctx, MIC, [storage], sdk.client_env(ctx, **app_env), netns=pod.ns)
    rec = sdk.check_tokens(ctx, pod.tenant, res, CLIENT_ID, fake=pod.fake)[storage]
    assert rec["assertion_sha256"] == pod.tok.rotations[-1]["sha256"], "the old service-account token was sent"
    assert pod.tok.content not in pod.logs("imdsd")
    pid = pod.container("imdsd")["State"]["Pid"]
    nices = harness.thread_nices(pid)    # the pod's seccomp profile lets the TLS handshakes' thread lower itself
    assert nices[pid] == 19 or list(nices.values()).count(19) == 1, f"imdsd's threads' nice values: {nices}"
    st = podman.proc_status(pid)
    record("deployment.yaml", start_to_ready_s=round(pod.ready_s, 3), imdsd_vmrss_kib=int(st["VmRSS"].split()[0]),
           imdsd_vmhwm_kib=int(st["VmHWM"].split()[0]))


test_pod_native_sidecar_deployment.timeout = 180


def test_pod_imds_address(ctx):
    """deployment-imds-address.yaml: the init container (root, NET_ADMIN only) adds 169.254.169.254;
    imdsd (uid 65532, no capability) answers there; the SDKs and curl need no environment at all."""
    podman.require_image()
    pod = start(ctx, "deployment-imds-address.yaml")
    check_pod_basics(pod)
    out = pod.ns.ip("-4", "addr", "show", "dev", "lo")
    assert "inet 169.254.169.254/32" in out, out
    env = sdk.client_env(ctx)
    sdk_round(ctx, pod, env)
    p = subprocess.run(pod.ns.prefix() + ["/usr/bin/curl", "-sS", "--max-time", "10", "-H", "Metadata: true",
                                          "http://169.254.169.254/metadata/identity/oauth2/token"
                                          "?api-version=2018-02-01&resource=https://management.azure.com/"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and json.loads(p.stdout)["access_token"] in sdk.fake_issued(ctx, pod.tenant, pod.fake), \
        p.stderr
    record("deployment-imds-address.yaml", start_to_ready_s=round(pod.ready_s, 3))


test_pod_imds_address.timeout = 180


def test_pod_without_the_webhook(ctx):
    """deployment-no-webhook.yaml: the projected token volume and the variables written out."""
    podman.require_image()
    pod = start(ctx, "deployment-no-webhook.yaml")
    check_pod_basics(pod)
    res = sdk.run_py(ctx, MIC, [ARM], sdk.imds_env(ctx, 8000), netns=pod.ns)
    sdk.check_tokens(ctx, pod.tenant, res, CLIENT_ID, fake=pod.fake)


test_pod_without_the_webhook.timeout = 120


# ---- the workload-identity webhook's proxy sidecar, with imdsd's image --------------------------

WEBHOOK_POD = os.path.join(harness.HERE, "webhook-proxy-pod.yaml")
# init/init-iptables.sh's rules (azure-workload-identity v1.6.0), written out: TCP to the IMDS address
# goes to the sidecar's port, except from uid 1501 (the proxy image's user). As there, no "set -e"
# and the last command's status (the listing): podman 4.3 runs an init container again when the pod
# restarts its containers, and the chains are there by then
INIT_SCRIPT = """port=${PROXY_PORT:-8000}
iptables -t nat -N AZWI_PROXY_OUTPUT
iptables -t nat -N AZWI_PROXY_REDIRECT
iptables -t nat -A AZWI_PROXY_REDIRECT -p tcp -j REDIRECT --to-port "$port"
iptables -t nat -A OUTPUT -p tcp -d 169.254.169.254 --dport 80 -j AZWI_PROXY_OUTPUT
iptables -t nat -A AZWI_PROXY_OUTPUT -m owner --uid-owner 1501 -j ACCEPT
iptables -t nat -A AZWI_PROXY_OUTPUT -j AZWI_PROXY_REDIRECT
iptables -t nat -S
"""
XTABLES = "/usr/lib/x86_64-linux-gnu/xtables"


def init_image(ctx):
    """A local stand-in for the webhook's proxy-init image (no registry can be reached here): busybox
    and Debian's iptables (xtables-nft-multi, its libraries and extensions) running INIT_SCRIPT.
    Tagged by the script's hash, so that a changed script makes a new image. Returns its name."""
    name = "localhost/imdsd-test-proxy-init:" + hashlib.sha256(INIT_SCRIPT.encode()).hexdigest()[:12]
    if podman.run("image", "exists", name, check=False).returncode == 0:
        return name
    root = os.path.join(ctx.tmp, "init-image", "rootfs")
    binary = os.path.realpath("/usr/sbin/iptables")
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = re.findall(r"(/\S+) \(0x", out)
    for src, dst in [("/bin/busybox", "/bin/busybox"), (binary, "/usr/sbin/iptables")] + [(l, l) for l in libs]:
        os.makedirs(os.path.dirname(root + dst), exist_ok=True)
        shutil.copy(os.path.realpath(src), root + dst)
    shutil.copytree(XTABLES, root + XTABLES)
    with open(os.path.join(root, "init-iptables.sh"), "w") as f:
        f.write(INIT_SCRIPT)
    with open(os.path.join(ctx.tmp, "init-image", "Containerfile"), "w") as f:
        f.write('FROM scratch\nCOPY rootfs/ /\nENTRYPOINT ["/bin/busybox", "sh", "/init-iptables.sh"]\n')
    podman.run("build", "--quiet", "--timestamp", "0", "--layers=false", "-t", name, os.path.join(ctx.tmp, "init-image"))
    return name


def pod_from_webhook(manifest, name, tenant, tok, fake_port, gateway, ca, init=None):
    """webhook-proxy-pod.yaml as a pod podman can play. Returns (pod, imdsd's container, {}, [])."""
    with open(manifest) as f:
        pod = yaml.safe_load(f)
    spec = pod["spec"]
    pod["metadata"]["name"] = name
    proxy_init, sidecar, app = spec["initContainers"][0], spec["containers"][0], spec["containers"][1]
    # 1. the images: the webhook's PROXY_IMAGE names imdsd's, as the README's quick start pushed it;
    #    PROXY_INIT_IMAGE the local stand-in; the application is busybox asking 169.254.169.254
    sidecar["image"] = quick_start_push()
    proxy_init["image"] = init
    app["image"] = APP_IMAGE
    app["command"] = ["/bin/busybox", "sh", "-c", APP_SCRIPT]
    # 2. the values the webhook takes from the service account and its own configuration
    for c in (proxy_init, sidecar, app):
        env_set(c, "AZURE_CLIENT_ID", CLIENT_ID)
        env_set(c, "AZURE_TENANT_ID", tenant)
        env_set(c, "AZURE_AUTHORITY_HOST", f"https://{ENTRA_NAME}:{fake_port}/")
    # 3. the token: a kubelet-style hostPath volume instead of the projection; no service account
    vol = spec["volumes"][0]
    vol.pop("projected")
    vol["hostPath"] = {"path": tok.root, "type": "Directory"}
    spec.pop("serviceAccountName")
    # 4. the stand-in Entra, at the pod network's gateway, trusted through the test CA
    env_set(sidecar, "IMDSD_CA_FILE", CA_PATH)
    sidecar["volumeMounts"].append({"name": "test-ca", "mountPath": CA_PATH, "readOnly": True})
    spec["volumes"].append({"name": "test-ca", "hostPath": {"path": ca, "type": "File"}})
    spec["hostAliases"] = [{"ip": gateway, "hostnames": [ENTRA_NAME]}]
    # 5. podman 4.3 without systemd waits 20 s for an init container's exit (see pod_from); and it
    #    runs no postStart hook: the test runs it, as the kubelet would
    pod["metadata"]["annotations"]["io.podman.annotations.init.container.type"] = "always"
    return pod, sidecar, {}, []


def test_pod_webhook_proxy_sidecar(ctx):
    """The pod the workload-identity webhook v1.6.0 makes of an annotated pod, with imdsd's image as
    its PROXY_IMAGE: the init container's redirect, imdsd started with the webhook's arguments, its
    postStart hook, and an application, the SDKs and go-autorest that know only 169.254.169.254."""
    podman.require_image()
    init = init_image(ctx)
    pod = Pod(ctx, WEBHOOK_POD, build=lambda *a: pod_from_webhook(*a, init=init), sidecar="azwi-proxy")
    assert "REDIRECT --to-ports 8000" in pod.logs("azwi-proxy-init"), pod.logs("azwi-proxy-init")
    p = podman.run("exec", f"{pod.name}-azwi-proxy", *pod.imdsd_spec["lifecycle"]["postStart"]["exec"]["command"],
                   check=False, timeout=30)
    assert p.returncode == 0 and p.stdout + p.stderr == "", f"the postStart hook: {p.returncode} {p.stderr}"
    wait_for(lambda: "app: token ok" in pod.logs("app"), 15, f"a token in the application's log: "
             f"{pod.logs('app')[-300:]}")
    env = sdk.client_env(ctx)   # no endpoint variable: the IMDS address, redirected
    sdk.check_tokens(ctx, pod.tenant, sdk.run_py(ctx, MIC, [ARM, VAULT], env, netns=pod.ns), CLIENT_ID, fake=pod.fake)
    sdk.check_tokens(ctx, pod.tenant, sdk.run_go(ctx, [GRAPH], env, netns=pod.ns), CLIENT_ID, fake=pod.fake)
    st = podman.proc_status(pod.container("azwi-proxy")["State"]["Pid"])
    assert st["Uid"].split()[:2] == ["65532", "65532"], st["Uid"]
    assert int(st["CapEff"], 16) == 0 and st["NoNewPrivs"] == "1", (st["CapEff"], st["NoNewPrivs"])
    assert pod.container("azwi-proxy")["HostConfig"]["ReadonlyRootfs"] is True
    assert pod.tok.content not in pod.logs("azwi-proxy")


test_pod_webhook_proxy_sidecar.timeout = 180


def timed_token(port, resource):
    """One token request on a connection made first: (status, milliseconds from the request's first
    byte sent to the whole answer read)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req = (f"GET {harness.token_url(resource)} HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: true\r\n"
               f"Connection: close\r\n\r\n").encode()
        got = b""
        t0 = time.perf_counter()
        s.sendall(req)
        while not harness.complete_response(got):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        ms = (time.perf_counter() - t0) * 1000
    finally:
        s.close()
    return harness.parse_raw(got).status, ms


def metric_at(pod, name):
    r = harness.request(pod.probe_port(pod.probes["livenessProbe"]), "/metrics", host=pod.ip)
    return next(float(line.split()[1]) for line in r.body.decode().splitlines() if line.startswith(name + " "))


def idle_app(prefetch=None):
    """pod_from with an application that asks for nothing (the test asks in its place, once the
    startup probe passes, as the kubelet starts it after a native sidecar's startup probe), and
    --prefetch=prefetch added to imdsd's arguments when given."""
    def build(manifest, *args):
        pod, imdsd, probes, sysctls = pod_from(manifest, *args)
        app = next(c for c in pod["spec"]["containers"] if c["name"] == "app")
        app["command"] = ["/bin/busybox", "sh", "-c", "trap 'exit 0' TERM; while :; do /bin/busybox sleep 1 & wait $!; done"]
        if prefetch:
            imdsd["args"] = list(imdsd.get("args", [])) + [f"--prefetch={prefetch}"]
        return pod, imdsd, probes, sysctls
    return build


def test_pod_start_to_first_token(ctx):
    """From `podman kube play` to the application's first token, deployment.yaml as it is and with
    --prefetch of the resource the application asks for: the startup probe (polled every 50 ms here)
    passes once the token file is usable, or once the prefetched token is cached; the application's
    first request after it is then an exchange with Entra, or a cache hit (the metrics say which).
    The figures go to build/pod-figures.json; make bench measures the same outside a pod."""
    podman.require_image()
    resource = "https://management.azure.com/"   # what the test application asks for
    figures = {}
    for label, build in (("plain", idle_app()), ("prefetch", idle_app(resource))):
        pod = Pod(ctx, "deployment.yaml", build=build)
        while pod.probe("startupProbe") != 200:
            assert time.monotonic() - pod.t0 < 30, f"startupProbe: {pod.logs('imdsd')[-1500:]}"
            time.sleep(0.05)
        ready_s = time.monotonic() - pod.t0
        hits = metric_at(pod, "imdsd_cache_hits_total")
        exchanges_before = len(pod.fake.records(pod.tenant))
        status, first_ms = harness.in_netns(pod.ns, timed_token, 8000, resource)
        first_token_s = time.monotonic() - pod.t0
        assert status == 200
        hit = metric_at(pod, "imdsd_cache_hits_total") - hits
        if label == "prefetch":
            assert exchanges_before >= 1, "the startup probe passed before the prefetched token was in"
            assert hit == 1, "the first request after readiness was not a cache hit"
        else:
            assert exchanges_before == 0 and hit == 0, "the plain pod's first request was not its first exchange"
        figures[label] = {"kube_play_to_ready_s": round(ready_s, 3), "first_request_ms": round(first_ms, 3),
                          "kube_play_to_first_token_s": round(first_token_s, 3), "cache_hit": hit == 1}
    record("start-to-first-token", **figures)


test_pod_start_to_first_token.timeout = 180
