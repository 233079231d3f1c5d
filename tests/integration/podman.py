"""podman for the image and pod tests, with container/containers.conf (as make image uses it)."""
import json
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
VERSION = open(os.path.join(ROOT, "VERSION")).read().strip()
# make image's IMAGE (the index in podman's store; its images are IMAGE-amd64 and IMAGE-arm64);
# IMDSD_IMAGE=NAME tests one built with make image IMAGE=NAME
IMAGE = os.environ.get("IMDSD_IMAGE") or f"localhost/imdsd:{VERSION}"
ARCHIVE = os.path.join(ROOT, "build", f"imdsd-{VERSION}.oci.tar")
ENV = dict(os.environ, CONTAINERS_CONF=os.path.join(ROOT, "container", "containers.conf"))


def run(*args, check=True, timeout=120, input=None):
    """podman ARGS; returns stdout (check: status 0 or an AssertionError with podman's stderr)."""
    p = subprocess.run(["podman"] + list(args), env=ENV, capture_output=True, text=True, timeout=timeout,
                       input=input)
    if check:
        assert p.returncode == 0, f"podman {' '.join(args[:3])}...: status {p.returncode}: {p.stderr.strip()[-1500:]}"
    return p.stdout if check else p


def inspect(kind, name):
    j = json.loads(run(kind, "inspect", name))
    return j[0] if isinstance(j, list) else j   # podman 4.3's pod inspect gives one object


def require_image():
    """The image make image built; an AssertionError saying so when it is missing."""
    p = run("image", "exists", IMAGE, check=False)
    assert p.returncode == 0, f"{IMAGE} is not in podman's store: run make image first"
    return inspect("image", IMAGE)


INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
QEMU = "qemu-aarch64-static"     # Debian's qemu-user-static: runs the arm64 binary, no binfmt needed
ARM64_BINARY = os.path.join(ROOT, "build", "arm64", "imdsd")


def archive_index(path=ARCHIVE):
    """Of the oci-archive at path: the image index's digest and the index itself (index.json names
    exactly one entry, the index, which lists an image manifest per platform)."""
    import hashlib, tarfile
    with tarfile.open(path) as outer:
        top = json.loads(outer.extractfile("index.json").read())
        assert len(top["manifests"]) == 1 and top["manifests"][0]["mediaType"] == INDEX_TYPE, top
        digest = top["manifests"][0]["digest"]
        data = outer.extractfile("blobs/sha256/" + digest.split(":", 1)[1]).read()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
        return digest, json.loads(data)


def require_arm64():
    """qemu-aarch64-static's path when make image built the arm64 image. Skips when it was told to
    build amd64 alone (IMAGE_ARCHS=amd64); fails when qemu-user-static is missing (make check
    installs it)."""
    import shutil
    import harness
    require_image()
    if "arm64" not in [m["platform"]["architecture"] for m in archive_index()[1]["manifests"]]:
        raise harness.Skip("the image index has no arm64 image (make image IMAGE_ARCHS=amd64)")
    assert os.access(ARM64_BINARY, os.X_OK), f"{ARM64_BINARY} is missing: run make image again"
    qemu = shutil.which(QEMU)
    assert qemu, f"{QEMU} is missing: make check installs it (tests/deps.sh --arm64-test)"
    return qemu


def proc_status(pid):
    """/proc/PID/status as a dict of stripped strings."""
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}


def reap_stale():
    """Removes pods and containers the tests named NAME-PID-N for runs whose process is gone."""
    import re
    for kind, fmt in (("pod", "{{.Name}}"), ("container", "{{.Names}}")):
        p = run(kind, "ps", "-a", "--format", fmt, check=False)
        for name in p.stdout.split() if p.returncode == 0 else []:
            m = re.fullmatch(r"imdsd-(?:pod|img)-(\d+)-\d+", name)
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                run(kind, "rm", "-f", name, check=False)


def kube_network():
    """podman kube play's network (created here when missing): {"name", "gateway"}."""
    name = "podman-default-kube-network"
    if run("network", "exists", name, check=False).returncode != 0:
        p = run("network", "create", name, check=False)
        assert p.returncode == 0 or run("network", "exists", name, check=False).returncode == 0, p.stderr
    net = json.loads(run("network", "inspect", name))[0]
    return {"name": name, "gateway": net["subnets"][0]["gateway"]}
