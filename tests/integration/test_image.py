"""The container image (make image, container/Containerfile): what is in it, that it is the same from
the same commit, and that the static binary in it finds Entra through the container's
/etc/resolv.conf (a stub DNS server in a network namespace) and /etc/hosts, running as uid 65532 on a
read-only root file system."""
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile

import harness
import podman
from harness import CLIENT_ID, assert_token_ok, get_token, request, wait_for
from podman import INDEX_TYPE, archive_index

ONLY_VARIANTS = ("plain",)   # the image carries its own (static) build
MAX_SIZE = 3 * 1024 * 1024
TOKEN_DIR = "/var/run/secrets/azure/tokens"
EXPECTED_FILES = {"imdsd": 0o755, "etc/passwd": 0o644, "etc/group": 0o644,
                  "etc/ssl/certs/ca-certificates.crt": 0o644}


PLATFORMS = ("amd64", "arm64")   # make image's IMAGE_ARCHS: one index, an image per architecture
ELF_MACHINE = {"amd64": "Advanced Micro Devices X86-64", "arm64": "AArch64"}


def archive_layers(path, arch="amd64"):
    """Of the oci-archive at path, the image for linux/arch: {name: TarInfo} of every layer's members,
    the manifest's digest, the image config, {name: bytes} of the regular files, and the layers'
    uncompressed size."""
    _, index = archive_index(path)
    with tarfile.open(path) as outer:
        def blob(digest):
            data = outer.extractfile("blobs/sha256/" + digest.split(":", 1)[1]).read()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
            return data
        mdesc = [m for m in index["manifests"] if m["platform"] == {"architecture": arch, "os": "linux"}]
        assert len(mdesc) == 1, f"the index has {len(mdesc)} images for linux/{arch}: {index}"
        manifest = json.loads(blob(mdesc[0]["digest"]))
        members, contents, size = {}, {}, 0
        for layer in manifest["layers"]:
            with tarfile.open(fileobj=io.BytesIO(blob(layer["digest"]))) as lt:
                size += sum(m.size for m in lt.getmembers())
                for m in lt.getmembers():
                    members[m.name.lstrip("./")] = m
                    if m.isfile():
                        contents[m.name.lstrip("./")] = lt.extractfile(m).read()
        return members, mdesc[0]["digest"], json.loads(blob(manifest["config"]["digest"])), contents, size


def check_binary(path, arch):
    """The image's binary: built for arch, static, position independent, full RELRO, stripped."""
    hdr = subprocess.run(["readelf", "-lhd", "-S", path], capture_output=True, text=True).stdout
    machine = [line.split(":", 1)[1].strip() for line in hdr.splitlines() if line.strip().startswith("Machine:")]
    assert machine == [ELF_MACHINE[arch]], f"{arch} binary built for {machine}"
    assert "DYN (Position-Independent Executable" in hdr or "Type:                              DYN" in hdr, hdr[:600]
    assert "INTERP" not in hdr and "NEEDED" not in hdr, f"the {arch} binary needs a dynamic loader or libraries"
    assert "GNU_RELRO" in hdr and "BIND_NOW" in hdr and "GNU_STACK" in hdr, f"{arch}: no full RELRO"
    assert ".symtab" not in hdr, f"the {arch} binary is not stripped"


def test_image_holds_the_static_binary_the_ca_bundle_and_nothing_else(ctx):
    img = podman.require_image()
    assert img["Size"] <= MAX_SIZE, f"image is {img['Size']} bytes, over {MAX_SIZE}"
    members, digest, config, contents, _ = archive_layers(podman.ARCHIVE)
    files = {n: m.mode & 0o7777 for n, m in members.items() if m.isfile()}
    assert files == EXPECTED_FILES, f"image files {files}"
    links = {n: m.linkname for n, m in members.items() if m.issym() or m.islnk()}
    assert links == {"proxy": "imdsd"}, f"links in the image: {links}"   # the webhook's postStart runs /proxy
    assert all(m.uid == 0 and m.gid == 0 and m.mtime == 0 for m in members.values()), "owner or time not fixed"
    cfg = config["config"]
    assert cfg["User"] == "65532:65532" and cfg["Entrypoint"] == ["/imdsd"], cfg
    labels = cfg["Labels"]
    rev = subprocess.run(["git", "-C", podman.ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", podman.ROOT, "diff", "--quiet", "HEAD", "--"]).returncode != 0
    assert labels["org.opencontainers.image.version"] == podman.VERSION, labels
    assert labels["org.opencontainers.image.revision"] == rev + ("-dirty" if dirty else ""), \
        f"{labels['org.opencontainers.image.revision']}: not the checkout's commit (run make image again)"
    assert labels["org.opencontainers.image.source"], labels
    assert config["created"] == "1970-01-01T00:00:00Z", config["created"]
    # the binary: static, position independent, full RELRO, stripped
    tmp = os.path.join(ctx.tmp, "imdsd")
    with open(tmp, "wb") as f:
        f.write(contents["imdsd"])
    check_binary(tmp, "amd64")
    # it runs, as 65532, with nothing else in the image (podman picks the amd64 image of the index)
    out = podman.run("run", "--rm", "--read-only", "--network", "none", podman.IMAGE, "--version")
    assert out.strip() == f"imdsd {podman.VERSION}", out
    out = podman.run("run", "--rm", "--read-only", "--network", "none", "--entrypoint", "/proxy", podman.IMAGE,
                     "--version")
    assert out.strip() == f"imdsd {podman.VERSION}", out
    p = podman.run("run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", podman.IMAGE, "-c", "id",
                   check=False)
    assert p.returncode != 0 and "no such file" in p.stderr.lower() or "not found" in p.stderr.lower(), p.stderr


def test_one_index_for_amd64_and_arm64(ctx):
    """The archive is one OCI image index: a linux/amd64 and a linux/arm64 image, each at most
    MAX_SIZE, the same files, labels and configuration but the architecture; the arm64 binary is
    checked like the amd64 one and runs (under qemu-aarch64-static)."""
    qemu = podman.require_arm64()
    digest, index = archive_index(podman.ARCHIVE)
    assert index["mediaType"] == INDEX_TYPE, index
    assert [m["platform"] for m in index["manifests"]] == [{"architecture": a, "os": "linux"} for a in PLATFORMS], \
        index
    images = {a: archive_layers(podman.ARCHIVE, a) for a in PLATFORMS}
    report = [f"# image index {digest}"]
    for a, (members, mdigest, config, contents, size) in images.items():
        assert size <= MAX_SIZE, f"the {a} image is {size} bytes, over {MAX_SIZE}"
        stored = podman.inspect("image", f"{podman.IMAGE}-{a}")
        assert stored["Size"] <= MAX_SIZE and stored["Architecture"] == a, (stored["Size"], stored["Architecture"])
        assert config["architecture"] == a and config["os"] == "linux", config
        report.append(f"# linux/{a}: manifest {mdigest}, {size} bytes in its layer, {stored['Size']} in podman's "
                      f"store, binary {len(contents['imdsd'])} bytes")
    (am, _, ac, acont, _), (rm, _, rc, rcont, _) = images["amd64"], images["arm64"]
    assert {n: (m.mode, m.linkname) for n, m in rm.items()} == {n: (m.mode, m.linkname) for n, m in am.items()}
    assert all(m.uid == 0 and m.gid == 0 and m.mtime == 0 for m in rm.values()), "owner or time not fixed"
    assert {n: c for n, c in rcont.items() if n != "imdsd"} == {n: c for n, c in acont.items() if n != "imdsd"}
    assert rc["config"] == ac["config"] and rc["created"] == ac["created"], (rc["config"], ac["config"])
    tmp = os.path.join(ctx.tmp, "imdsd-arm64")
    with open(tmp, "wb") as f:
        f.write(rcont["imdsd"])
    os.chmod(tmp, 0o755)
    check_binary(tmp, "arm64")
    with open(os.path.join(podman.ROOT, "build", "arm64", "imdsd"), "rb") as f:
        assert f.read() == rcont["imdsd"], "the arm64 image's binary is not build/arm64/imdsd"
    p = subprocess.run([qemu, tmp, "--version"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stdout.strip() == f"imdsd {podman.VERSION}", (p.returncode, p.stdout, p.stderr)
    print("\n".join(report))


def test_same_commit_same_digest(ctx):
    """The sources copied elsewhere and built again without podman's cache: the same index digest,
    so the same image for each architecture."""
    podman.require_image()
    digest, index = archive_index(podman.ARCHIVE)
    archs = [m["platform"]["architecture"] for m in index["manifests"]]
    _, _, config, _, _ = archive_layers(podman.ARCHIVE, archs[0])
    labels = config["config"]["Labels"]
    src = os.path.join(ctx.tmp, "elsewhere", "imdsd-src")
    for part in ("Makefile", "VERSION", "daemon", "include", "container", "tests/deps.sh"):
        dst = os.path.join(src, part)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        (shutil.copytree if os.path.isdir(os.path.join(podman.ROOT, part)) else shutil.copy2)(
            os.path.join(podman.ROOT, part), dst)
    tag = f"localhost/imdsd-repro:{os.getpid()}-{harness.unique()}"
    p = subprocess.run(["make", "-s", "-C", src, "-j2", "image-build", f"IMAGE={tag}", "PODMAN_BUILD_FLAGS=--no-cache",
                        f"IMAGE_ARCHS={' '.join(archs)}",
                        f"REVISION={labels['org.opencontainers.image.revision']}",
                        f"IMAGE_SOURCE={labels['org.opencontainers.image.source']}"],
                       capture_output=True, text=True, env=podman.ENV)
    try:
        assert p.returncode == 0, p.stderr[-2000:]
        digest2, index2 = archive_index(os.path.join(src, "build", f"imdsd-{podman.VERSION}.oci.tar"))
        assert digest2 == digest, f"rebuilt elsewhere: index {digest2} {index2}, make image: {digest} {index}"
    finally:
        podman.run("manifest", "rm", tag, check=False)
        podman.run("rmi", *[f"{tag}-{a}" for a in archs], check=False)


test_same_commit_same_digest.timeout = 240


class Container:
    """imdsd's image run in a network namespace, as a pod's sidecar runs: read-only, its user, the
    token directory mounted read-only. Stopped (SIGTERM, exit status 0 expected) by ctx.finish()."""

    def __init__(self, ctx, ns, args, podman_args=()):
        self.name = f"imdsd-img-{os.getpid()}-{harness.unique()}"
        self.ns = ns
        podman.reap_stale()
        podman.run("run", "-d", "--name", self.name, "--network", f"ns:/run/netns/{ns.name}", "--read-only",
                   *podman_args, podman.IMAGE, *args)
        ctx.cleanups.append(self.stop)
        self.pid = podman.inspect("container", self.name)["State"]["Pid"]

    def logs(self):
        p = podman.run("logs", self.name, check=False)
        return p.stdout + p.stderr

    def stop(self):
        try:
            podman.run("stop", "-t", "10", self.name)
            state = podman.inspect("container", self.name)["State"]
            assert state["ExitCode"] == 0, f"{self.name} exited {state['ExitCode']}: {self.logs()[-1500:]}"
        finally:
            podman.run("rm", "-f", self.name, check=False)


def entra_in_netns(ctx):
    """A namespace with the stand-in Entra on its 127.0.0.1, and a kubelet-style token volume."""
    ns = ctx.netns()
    tok = harness.KubeletToken(os.path.join(ctx.tmp, f"tokens-{harness.unique()}"))
    fake = harness.Fake(ctx.tmp, f"img-{harness.unique()}", ctx.certs["leaf.pem"], ctx.certs["leaf.key"], netns=ns,
                        token_file=tok.path)
    ctx.cleanups.append(fake.stop)
    tenant = ctx.tenant("ok")
    fake.control(tenant, token_file=tok.path)
    return ns, tok, fake, tenant


def sidecar_args(ctx, tenant, host, fake):
    return (["-e", f"AZURE_CLIENT_ID={CLIENT_ID}", "-e", f"AZURE_TENANT_ID={tenant}",
             "-e", f"AZURE_FEDERATED_TOKEN_FILE={TOKEN_DIR}/azure-identity-token",
             "-e", f"AZURE_AUTHORITY_HOST=https://{host}:{fake.port}/",
             "-v", f"{ctx.certs['ca.pem']}:/etc/imdsd/ca.pem:ro", "-e", "IMDSD_CA_FILE=/etc/imdsd/ca.pem"],
            ["--log-level", "debug"])


def start_sidecar(ctx, ns, tok, fake, tenant, host, podman_args):
    env_args, args = sidecar_args(ctx, tenant, host, fake)
    c = Container(ctx, ns, args, ["-v", f"{tok.root}:{TOKEN_DIR}:ro"] + env_args + list(podman_args))

    wait_for(lambda: healthy(8000, ns), 10, f"/healthz of {c.name}: {c.logs()[-800:]}")
    return c


def check_unprivileged(c):
    st = podman.proc_status(c.pid)
    assert st["Uid"].split()[:2] == ["65532", "65532"] and st["Gid"].split()[:2] == ["65532", "65532"], st["Uid"]
    assert int(st["CapEff"], 16) == 0, st["CapEff"]
    assert podman.inspect("container", c.name)["HostConfig"]["ReadonlyRootfs"] is True
    with open(f"/proc/{c.pid}/mountinfo") as f:
        root = [line.split() for line in f if line.split()[4] == "/"]
    assert root and "ro" in root[0][5].split(","), f"root mount {root}"


def test_image_resolves_entra_through_resolv_conf(ctx):
    ns, tok, fake, tenant = entra_in_netns(ctx)
    log = os.path.join(ctx.tmp, "dns.log")
    dns = subprocess.Popen(ns.prefix() + ["/usr/bin/python3", os.path.join(harness.HERE, "stub_dns.py"), "127.0.0.53",
                                         log, "login.entra.test=127.0.0.1"], stdout=subprocess.PIPE, text=True)
    ctx.cleanups.append(dns.kill)
    assert dns.stdout.readline().strip() == "ready"
    c = start_sidecar(ctx, ns, tok, fake, tenant, "login.entra.test", ["--dns", "127.0.0.53"])
    check_unprivileged(c)
    r = get_token(8000, netns=ns)
    assert_token_ok(r)
    assert r.json["access_token"] in {x["access_token"] for x in fake.records(tenant) if x.get("access_token")}
    with open(log) as f:
        queries = f.read().split("\n")
    assert "login.entra.test A" in queries, queries
    # the exec probe works in the image, which has no shell and no curl
    p = podman.run("exec", c.name, "/imdsd", "--probe", "127.0.0.1:8000/readyz", check=False)
    assert p.returncode == 0 and p.stdout + p.stderr == "", p.stderr
    # a name the DNS server does not know: an error the SDKs understand, nothing cached, no crash
    env_args, args = sidecar_args(ctx, tenant, "unknown.entra.test", fake)
    bad = Container(ctx, ns, args + ["--listen", "127.0.0.1:8002"],
                    ["-v", f"{tok.root}:{TOKEN_DIR}:ro", "--dns", "127.0.0.53"] + env_args)
    wait_for(lambda: healthy(8002, ns), 10, "/healthz of the second container")
    r = get_token(8002, netns=ns)
    assert r.status in (500, 503) and "error" in r.json, r
    with open(log) as f:
        assert "unknown.entra.test A" in f.read().split("\n")
    assert tok.content not in c.logs() + bad.logs() and r.json.get("access_token") is None


def healthy(port, ns):
    """imdsd answers /healthz on port inside ns."""
    try:
        return request(port, "/healthz", timeout=1, netns=ns).status == 200
    except OSError:
        return False


def loaded(c, fp):
    return any(e.get("fp") == fp for e in harness.log_events(c.logs(), "token_file_loaded"))


def test_image_resolves_entra_through_etc_hosts_and_follows_rotation(ctx):
    ns, tok, fake, tenant = entra_in_netns(ctx)
    # no DNS server answers at 127.0.0.9: only /etc/hosts can resolve the name
    c = start_sidecar(ctx, ns, tok, fake, tenant, "hosts.entra.test",
                      ["--dns", "127.0.0.9", "--add-host", "hosts.entra.test:127.0.0.1"])
    assert_token_ok(get_token(8000, netns=ns))
    assert fake.records(tenant)[-1]["assertion_sha256"] == tok.rotations[-1]["sha256"]
    # the kubelet's atomic writer swaps ..data on the host: the container sees the new token
    tok.rotate()
    wait_for(lambda: loaded(c, tok.rotations[-1]["fp"]), 10, "the rotated token in the container's log")
    vault = "https://vault.azure.net"
    assert_token_ok(get_token(8000, resource=vault, netns=ns), resource=vault)
    assert fake.records(tenant)[-1]["assertion_sha256"] == tok.rotations[-1]["sha256"], "old assertion sent"
    assert tok.content not in c.logs()
