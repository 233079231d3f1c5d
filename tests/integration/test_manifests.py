"""The Kubernetes manifests in container/kubernetes/: valid against the Kubernetes API schema, and
hardened the way docs/deployment.md's "Kubernetes sidecar" section says.

1. Every document validates (tests/k8s/validate.mjs: the schema of its apiVersion/kind from the
   pinned `kubernetes-models`, unknown fields rejected; offline once `npm ci` has run there).
2. The validator is not lax: mutated copies (an unknown field, a wrong type, a misspelled key, a
   wrong enum value, a missing required field) fail, naming the path.
3. Policy, on the parsed YAML: resources, securityContext, the native sidecar and its probes, the one
   capability of the IMDS-address init container, and what each variant needs (webhook label and
   skip-containers; the IMDS address; the token volume and AZURE_* written out).

These tests do not run imdsd and take no `ctx`, so conftest.py does not repeat them per variant.
"""
import glob
import os
import re
import subprocess
import sys

import pytest
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
K8S = os.path.join(ROOT, "tests", "k8s")
VALIDATE = os.path.join(K8S, "validate.mjs")
MANIFEST_DIR = os.path.join(ROOT, "container", "kubernetes")
MANIFESTS = sorted(glob.glob(os.path.join(MANIFEST_DIR, "*.yaml")))
sys.path.insert(0, os.path.join(ROOT, "tests", "compat"))
import sdk_clients as sdk  # noqa: E402

NODE = sdk.NODE

# what each known manifest must show (any other *.yaml gets the common checks only)
VARIANTS = {
    "deployment.yaml": "webhook",
    "deployment-imds-address.yaml": "imds-address",
    "deployment-no-webhook.yaml": "no-webhook",
}
HEALTH_PORT, TOKEN_PORT = 8001, 8000
WEBHOOK_LABEL = "azure.workload.identity/use"
SKIP_ANNOTATION = "azure.workload.identity/skip-containers"
AUDIENCE = "api://AzureADTokenExchange"
IDENTITY_ENV = ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_AUTHORITY_HOST")
# with these the SDKs do the exchange themselves and bypass imdsd (docs/deployment.md: environment precedence traps)
APP_FORBIDDEN_ENV = ("AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_AUTHORITY_HOST")


# ---- the validator: node + tests/k8s/node_modules ------------------------------------------------

def _ensure_node_modules():
    """npm ci in tests/k8s (as for the SDK clients), or a skip saying what is missing."""
    major = sdk.node_major()
    if major is None:
        raise pytest.skip.Exception("node is not installed (make deps installs Debian's nodejs)")
    if major < 18:
        raise pytest.skip.Exception(f"node {major} is too old: tests/k8s/validate.mjs needs Node.js >= 18")
    if not os.access(sdk.NPM, os.X_OK):
        raise pytest.skip.Exception("npm is not installed (make deps installs Debian's npm)")
    sdk.npm_ci(K8S)


@pytest.fixture(scope="module")
def validate():
    """run(paths) -> (exit status, {path: [output lines]}): validate.mjs on those files."""
    _ensure_node_modules()

    def run(paths):
        p = subprocess.run([NODE, VALIDATE, *paths], cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode in (0, 1), f"validate.mjs exited {p.returncode}: {p.stderr.strip()[-800:]}"
        lines = {}
        for line in p.stdout.splitlines():
            m = re.match(r"(ok|FAIL) (\S+) ", line)
            assert m, f"unexpected output line from validate.mjs: {line!r}"
            lines.setdefault(m.group(2), []).append(line)
        return p.returncode, lines
    return run


def _rel(path):
    return os.path.relpath(path, ROOT)


def _documents(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# ---- 1. every manifest validates -----------------------------------------------------------------

def test_manifests_present():
    names = {os.path.basename(p) for p in MANIFESTS}
    assert set(VARIANTS) <= names, f"missing in container/kubernetes: {sorted(set(VARIANTS) - names)}"


def test_manifests_validate(validate):
    status, lines = validate([_rel(p) for p in MANIFESTS])
    report = "\n".join(line for p in MANIFESTS for line in lines.get(_rel(p), []))
    assert status == 0, f"schema validation failed:\n{report}"
    for path in MANIFESTS:
        docs = _documents(path)
        want = [f"ok {_rel(path)} {d['kind']}/{d['metadata']['name']}" for d in docs]
        assert lines.get(_rel(path)) == want, f"{_rel(path)}: expected one ok line per document:\n{report}"


# ---- 2. the validator rejects what the API server would drop or refuse --------------------------

def _pod_spec(doc):
    return doc["spec"]["template"]["spec"] if doc["kind"] != "Pod" else doc["spec"]


def _sidecar_index(spec):
    return next(i for i, c in enumerate(spec["initContainers"]) if c["name"] == "imdsd")


def _mutate_unknown_security_field(c, pod):
    c["securityContext"]["runAsUsr"] = 65532
    return "securityContext/runAsUsr", "unknown field"


def _mutate_wrong_type(c, pod):
    c["securityContext"]["runAsUser"] = "x"
    return "securityContext/runAsUser", "must be integer"


def _mutate_misspelled_restart_policy(c, pod):
    c["restartPolcy"] = c.pop("restartPolicy")
    return "restartPolcy", "unknown field"


def _mutate_misspelled_security_context(c, pod):
    c["securityContex"] = c.pop("securityContext")
    return "securityContex", "unknown field"


def _mutate_probe_typo(c, pod):
    c["startupProbe"]["httpGet"]["paht"] = c["startupProbe"]["httpGet"].pop("path")
    return "startupProbe/httpGet/paht", "unknown field"


def _mutate_bad_enum(c, pod):
    c["securityContext"]["seccompProfile"]["type"] = "runtimedefault"
    return "securityContext/seccompProfile/type", "must be equal to one of the allowed values"


def _mutate_missing_name(c, pod):
    del c["name"]
    return "", "must have required property name"


def _mutate_pod_security_typo(c, pod):
    pod["securityContext"]["fsGrup"] = pod["securityContext"].pop("fsGroup")
    return "/spec/template/spec/securityContext/fsGrup", "unknown field"


MUTATIONS = {
    "unknown-securityContext-field": _mutate_unknown_security_field,
    "wrong-type-runAsUser": _mutate_wrong_type,
    "misspelled-restartPolicy": _mutate_misspelled_restart_policy,
    "misspelled-securityContext": _mutate_misspelled_security_context,
    "probe-field-typo": _mutate_probe_typo,
    "bad-enum-seccomp": _mutate_bad_enum,
    "missing-required-name": _mutate_missing_name,
    "pod-securityContext-typo": _mutate_pod_security_typo,
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_validator_rejects_mutation(validate, tmp_path, mutation):
    source = os.path.join(MANIFEST_DIR, "deployment.yaml")
    docs = _documents(source)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = _pod_spec(deployment)
    index = _sidecar_index(pod)
    where, message = MUTATIONS[mutation](pod["initContainers"][index], pod)
    if not where.startswith("/"):
        where = f"/spec/template/spec/initContainers/{index}" + (f"/{where}" if where else "")
    mutant = tmp_path / f"{mutation}.yaml"
    mutant.write_text(yaml.safe_dump_all(docs, sort_keys=False))

    status, lines = validate([str(mutant)])
    out = "\n".join(lines.get(str(mutant), []))
    assert status == 1, f"{mutation}: the validator accepted the mutated manifest:\n{out}"
    fails = [line for line in lines[str(mutant)] if line.startswith(f"FAIL {mutant} Deployment/")]
    assert len(fails) == 1, f"{mutation}: expected one FAIL line for the Deployment:\n{out}"
    assert f"{where} {message}" in fails[0], f"{mutation}: expected '{where} {message}' in:\n{fails[0]}"
    # the other documents are still reported, each on its own line
    assert f"ok {mutant} ServiceAccount/" in out, out


# ---- 3. policy ------------------------------------------------------------------------------------

def _env(container):
    return {e["name"]: e.get("value") for e in container.get("env") or []}


def _port_number(container, port):
    if isinstance(port, int):
        return port
    named = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
    assert port in named, f"{container['name']}: probe port {port!r} is not a named port of the container"
    return named[port]


def _probes(container):
    return {k: container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in container}


def _is_sidecar(container):
    return container.get("restartPolicy") == "Always"


def _check_container(name, c, pod, kind):
    sc = c.get("securityContext") or {}
    psc = pod.get("securityContext") or {}
    res = c.get("resources") or {}
    assert res.get("requests", {}).get("cpu") and res["requests"].get("memory"), \
        f"{name}: resources.requests needs cpu and memory (hard ResourceQuota)"
    assert (res.get("limits") or {}).get("memory"), f"{name}: resources.limits.memory is missing"
    assert sc.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem must be true"
    assert sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation must be false"
    assert (sc.get("capabilities") or {}).get("drop") == ["ALL"], f"{name}: capabilities.drop must be [ALL]"
    seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
    assert seccomp == "RuntimeDefault", f"{name}: seccompProfile RuntimeDefault (container or pod level)"
    assert sc.get("privileged") in (None, False), f"{name}: must not be privileged"
    add = (sc.get("capabilities") or {}).get("add") or []
    if c["name"] == "imds-address" and kind == "init":
        assert add == ["NET_ADMIN"], f"{name}: only NET_ADMIN may be added, got {add}"
        assert sc.get("runAsUser") == 0, f"{name}: runs as root (added capabilities reach root only)"
    else:
        assert add == [], f"{name}: adds capabilities {add}; only the imds-address init container may"
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        assert non_root is True, f"{name}: runAsNonRoot must be true"
    for probe_name, probe in _probes(c).items():
        port = (probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc") or {}).get("port")
        if port is not None:
            assert _port_number(c, port) != TOKEN_PORT, \
                f"{name}: {probe_name} uses the token port {TOKEN_PORT} (loopback only: the kubelet cannot reach it)"


def _check_sidecar(path, pod):
    assert all(c["name"] != "imdsd" for c in pod.get("containers", [])), \
        f"{path}: imdsd must be a native sidecar (initContainers, restartPolicy: Always), not in containers"
    inits = pod.get("initContainers") or []
    sidecars = [c for c in inits if c["name"] == "imdsd"]
    assert len(sidecars) == 1, f"{path}: one imdsd in initContainers"
    c = sidecars[0]
    assert c.get("restartPolicy") == "Always", f"{path}: imdsd needs restartPolicy: Always (native sidecar)"
    sc = c["securityContext"]
    assert sc.get("runAsNonRoot") is True and sc.get("runAsUser") == 65532 and sc.get("runAsGroup") == 65532, \
        f"{path}: imdsd runs as 65532:65532, runAsNonRoot"
    args = c.get("args") or []
    assert "--listen=127.0.0.1:8000" in args, f"{path}: imdsd serves tokens on 127.0.0.1:8000: {args}"
    assert f"--health-listen=0.0.0.0:{HEALTH_PORT}" in args, f"{path}: probes need --health-listen: {args}"
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
    assert ports.get("health") == HEALTH_PORT, f"{path}: imdsd declares port health = {HEALTH_PORT}: {ports}"
    want = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    probes = _probes(c)
    assert set(probes) == set(want), f"{path}: imdsd needs startup, readiness and liveness probes: {sorted(probes)}"
    for name, url in want.items():
        get = probes[name].get("httpGet") or {}
        assert get.get("path") == url, f"{path}: imdsd {name} must GET {url}, not {get.get('path')}"
        assert get.get("port") in (HEALTH_PORT, "health"), f"{path}: imdsd {name} must use port health/{HEALTH_PORT}"
        assert _port_number(c, get["port"]) == HEALTH_PORT
    startup = probes["startupProbe"]
    assert startup.get("periodSeconds", 10) <= 2, f"{path}: the startup probe should poll about every second"
    assert startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 20, \
        f"{path}: the startup probe should allow some 30 s for the token to appear"
    # the regular init containers (imds-address) run to completion before the sidecar starts
    position = inits.index(c)
    assert all(not _is_sidecar(i) for i in inits[:position]), f"{path}: imdsd should be the first sidecar"
    return c


def _check_webhook(path, pod, template, docs, expect_label):
    labels = (template.get("metadata") or {}).get("labels") or {}
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    if not expect_label:
        assert WEBHOOK_LABEL not in labels, f"{path}: the no-webhook variant must not carry {WEBHOOK_LABEL}"
        return
    assert labels.get(WEBHOOK_LABEL) == "true", f"{path}: pod template label {WEBHOOK_LABEL}: \"true\" (a string)"
    skip = {s.strip() for s in annotations.get(SKIP_ANNOTATION, "").split(";") if s.strip()}
    others = {c["name"] for c in pod.get("initContainers", []) + pod.get("containers", []) if c["name"] != "imdsd"}
    assert "app" in skip, f"{path}: {SKIP_ANNOTATION} must name the app container: {skip}"
    assert skip == others, f"{path}: {SKIP_ANNOTATION} should list every container but imdsd: {skip} vs {others}"
    sa = next((d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == pod.get("serviceAccountName")),
              None)
    assert sa is not None, f"{path}: the ServiceAccount {pod.get('serviceAccountName')!r} is not in the file"
    client_id = ((sa["metadata"].get("annotations") or {}).get("azure.workload.identity/client-id"))
    assert client_id and re.fullmatch(r"[0-9a-fA-F-]{36}", client_id), f"{path}: the ServiceAccount needs a client-id"


def _check_imds_address(path, pod, sidecar):
    inits = pod["initContainers"]
    names = [c["name"] for c in inits]
    assert "imds-address" in names and names.index("imds-address") < names.index("imdsd"), \
        f"{path}: imds-address must run before imdsd: {names}"
    init = inits[names.index("imds-address")]
    assert not _is_sidecar(init), f"{path}: imds-address is a run-to-completion init container"
    assert init.get("args") == ["--add-loopback-address=169.254.169.254"], f"{path}: imds-address args {init.get('args')}"
    assert init.get("image") == sidecar.get("image"), f"{path}: imds-address uses the imdsd image"
    sysctls = {s["name"]: s["value"] for s in (pod.get("securityContext") or {}).get("sysctls") or []}
    assert sysctls.get("net.ipv4.ip_unprivileged_port_start") == "80", \
        f"{path}: imdsd binds port 80 without a capability thanks to net.ipv4.ip_unprivileged_port_start=80"
    assert "--listen=169.254.169.254:80" in sidecar.get("args", []), f"{path}: imdsd must listen on 169.254.169.254:80"
    for c in pod["containers"]:
        assert "AZURE_POD_IDENTITY_AUTHORITY_HOST" not in _env(c), f"{path}: {c['name']} needs no override here"


def _check_token_volume(path, pod, sidecar):
    projections = {}
    for v in pod.get("volumes") or []:
        for s in (v.get("projected") or {}).get("sources") or []:
            if "serviceAccountToken" in s:
                projections[v["name"]] = s["serviceAccountToken"]
    assert projections, f"{path}: no projected serviceAccountToken volume"
    (name, token), = projections.items()
    assert token.get("audience") == AUDIENCE, f"{path}: token audience must be {AUDIENCE}"
    assert 3600 <= token.get("expirationSeconds", 3600) <= 86400, f"{path}: expirationSeconds 3600..86400"
    mounts = [m for m in sidecar.get("volumeMounts") or [] if m["name"] == name]
    assert len(mounts) == 1 and mounts[0].get("readOnly") is True, f"{path}: imdsd mounts the token read-only"
    assert "subPath" not in mounts[0] and "subPathExpr" not in mounts[0], f"{path}: a subPath token never rotates"
    for c in pod.get("initContainers", []) + pod.get("containers", []):
        if c is not sidecar:
            assert all(m["name"] != name for m in c.get("volumeMounts") or []), f"{path}: only imdsd gets the token"
    env = _env(sidecar)
    missing = [k for k in IDENTITY_ENV if not env.get(k)]
    assert not missing, f"{path}: imdsd needs {missing} without the webhook"
    assert env["AZURE_FEDERATED_TOKEN_FILE"] == mounts[0]["mountPath"].rstrip("/") + "/" + token["path"], \
        f"{path}: AZURE_FEDERATED_TOKEN_FILE {env['AZURE_FEDERATED_TOKEN_FILE']} is not the mounted token"
    assert env["AZURE_AUTHORITY_HOST"].startswith("https://"), f"{path}: AZURE_AUTHORITY_HOST must be https://"
    for key in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID"):
        assert re.fullmatch(r"[0-9a-fA-F-]{36}", env[key]), f"{path}: {key} placeholder should be a GUID"


@pytest.mark.parametrize("manifest", [os.path.basename(p) for p in MANIFESTS])
def test_manifest_policy(manifest):
    path = os.path.join(MANIFEST_DIR, manifest)
    variant = VARIANTS.get(manifest)
    docs = _documents(path)
    workloads = [d for d in docs if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job", "Pod")]
    assert workloads, f"{manifest}: no workload"
    for doc in workloads:
        pod = _pod_spec(doc)
        template = doc["spec"]["template"] if doc["kind"] != "Pod" else doc
        psc = pod.get("securityContext") or {}
        assert (psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{manifest}: pod seccomp"
        assert psc.get("fsGroup") == 65532, f"{manifest}: pod fsGroup 65532 makes the token readable by imdsd"
        grace = pod.get("terminationGracePeriodSeconds")
        assert isinstance(grace, int) and 10 <= grace <= 120, f"{manifest}: terminationGracePeriodSeconds {grace}"
        for kind in ("initContainers", "containers"):
            for c in pod.get(kind) or []:
                _check_container(f"{manifest} {kind}/{c['name']}", c, pod, "init" if kind == "initContainers" else "app")
        sidecar = _check_sidecar(manifest, pod)
        apps = pod["containers"]
        assert [c["name"] for c in apps] == ["app"], f"{manifest}: containers {[c['name'] for c in apps]}"
        for c in apps:
            bad = [k for k in APP_FORBIDDEN_ENV if k in _env(c)]
            assert not bad, f"{manifest}: {c['name']} has {bad}: the SDK would bypass imdsd"
        if variant is None:
            continue
        _check_webhook(manifest, pod, template, docs, expect_label=variant != "no-webhook")
        if variant == "imds-address":
            _check_imds_address(manifest, pod, sidecar)
        else:
            assert all(c["name"] != "imds-address" for c in pod.get("initContainers", [])), manifest
            assert _env(apps[0]).get("AZURE_POD_IDENTITY_AUTHORITY_HOST") == "http://127.0.0.1:8000", \
                f"{manifest}: the app points the Python/JS SDKs at imdsd"
        if variant == "no-webhook":
            _check_token_volume(manifest, pod, sidecar)
