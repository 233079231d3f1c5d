"""tests/check_docs.py (run by make lint) fails when the docs lose what the project has: an
option's line, a metric's row, a linked file or section, a manifest's or unit's description, or a
path that no longer exists. Each case breaks one thing in a copy of the tracked tree."""
import os
import re
import shutil
import subprocess

import harness

ONLY_VARIANTS = ("plain",)   # the docs, not a build variant
ROOT = os.path.abspath(os.path.join(harness.HERE, "..", ".."))
CHECK = os.path.join(ROOT, "tests", "check_docs.py")


def tree_copy(ctx):
    """The tracked files as they are in the work tree, in a new folder."""
    dest = os.path.join(ctx.tmp, "tree")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))
    return dest


def check(root):
    p = subprocess.run(["/usr/bin/python3", CHECK, "--root", root, "--binary", harness.BINARY],
                       capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout


def edit(root, rel, fn):
    path = os.path.join(root, rel)
    with open(path) as f:
        text = f.read()
    new = fn(text)
    assert new != text, f"the edit changed nothing in {rel}"
    with open(path, "w") as f:
        f.write(new)


def drop_lines(pattern):
    return lambda text: "".join(l for l in text.splitlines(True) if not re.search(pattern, l))


def everywhere(root, pattern, fn):
    """Applies fn to README.md and each docs/*.md where pattern occurs."""
    docs = ["README.md"] + [os.path.join("docs", f) for f in os.listdir(os.path.join(root, "docs"))]
    hit = 0
    for rel in docs:
        with open(os.path.join(root, rel)) as f:
            if re.search(pattern, f.read()):
                edit(root, rel, fn)
                hit += 1
    assert hit, f"{pattern} is in no doc"


def drop_everywhere(root, pattern):
    everywhere(root, pattern, drop_lines(pattern))


def rename_everywhere(root, old, new):
    everywhere(root, re.escape(old), lambda t: t.replace(old, new))


def test_docs_check_passes_on_the_tree_and_fails_on_each_breakage(ctx):
    base = tree_copy(ctx)
    rc, out = check(base)
    assert rc == 0, out
    cases = [
        # (what is broken, the edit, what the check must say)
        ("an option's lines", lambda r: drop_everywhere(r, r"--max-health-connections"),
         "options: --max-health-connections"),
        ("a metric's row", lambda r: drop_everywhere(r, r"imdsd_http_buffered_bytes"),
         "metrics: imdsd_http_buffered_bytes"),
        ("a linked file", lambda r: os.remove(os.path.join(r, "docs", "endpoints.md")),
         "links: README.md links to docs/endpoints.md"),
        ("a linked section", lambda r: edit(r, "docs/deployment.md",
                                            lambda t: t.replace("## Kubernetes sidecar", "## Pods")),
         "links: README.md links to docs/deployment.md#kubernetes-sidecar"),
        ("a manifest's description", lambda r: rename_everywhere(r, "deployment-no-webhook.yaml", "x.yaml"),
         "units: deployment-no-webhook.yaml"),
        ("a unit's description", lambda r: rename_everywhere(r, "imdsd-health.socket", "x.socket"),
         "units: imdsd-health.socket"),
        ("a path that is gone", lambda r: os.remove(os.path.join(r, "tests", "fuzz", "totals.sh")),
         "names `tests/fuzz/totals.sh`, which does not exist"),
    ]
    for what, breakage, says in cases:
        root = os.path.join(ctx.tmp, re.sub(r"\W+", "-", what))
        shutil.copytree(base, root)
        breakage(root)
        rc, out = check(root)
        assert rc == 1 and says in out, f"{what}: the check did not catch it (rc {rc}):\n{out}"


def test_docs_check_renders_the_man_page(ctx):
    """imdsd(8) as make man writes it renders with man -l and names every option; one whose
    option list lost a line, or with a broken request, fails the check."""
    good = os.path.join(ctx.tmp, "imdsd.8")
    with open(good, "w") as f:
        subprocess.run([os.path.join(ROOT, "man", "mkman.sh"), harness.BINARY,
                        os.path.join(ROOT, "man", "imdsd.8.in")], stdout=f, check=True, cwd=ROOT)
    args = ["/usr/bin/python3", CHECK, "--root", ROOT, "--binary", harness.BINARY, "--man"]
    p = subprocess.run(args + [good], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout
    with open(good) as f:
        text = f.read()
    for what, broken in (("an option lost", re.sub(r".*max\\-health\\-connections.*\n", "", text)),
                         ("an unknown request", text.replace(".SH", ".XYZZY", 1))):
        assert broken != text, what
        bad = os.path.join(ctx.tmp, "bad.8")
        with open(bad, "w") as f:
            f.write(broken)
        p = subprocess.run(args + [bad], capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and "man: " in p.stdout, f"{what}: not caught:\n{p.stdout}"
