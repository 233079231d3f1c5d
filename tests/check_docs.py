#!/usr/bin/python3
"""check_docs.py - the Markdown docs still say what the project has (make lint runs it).

  tests/check_docs.py [--root DIR] [--binary PATH]

Checks, over README.md, docs/*.md and every other tracked *.md under DIR:
  options    every --option that `imdsd --help` lists is named in README.md or docs/
  metrics    every metric daemon/metrics_render.c can emit is named in README.md or docs/
  links      every relative link resolves to a file, and a #fragment to a heading there
  paths      every repository path in `backticks` (daemon/..., tests/..., ...) exists
  units      every manifest in container/kubernetes/ and file in systemd/ is named in the docs
  man        with --man FILE: imdsd(8) renders with `man -l` without a warning, every option in it
Prints one line per problem and "docs: N passed, N failed" last; exits 1 on any problem.
"""
import argparse
import glob
import os
import re
import subprocess
import sys

TOP_DIRS = ("daemon", "include", "tests", "container", "systemd", "man", "docs", ".ci")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
TICKED = re.compile(r"`([^`\s]+)`")


def markdown_files(root):
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in (".git", "build", "node_modules")]
        out += [os.path.join(dirpath, f) for f in filenames if f.endswith(".md")]
    return sorted(out)


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, blanks to -."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(path):
    found, in_code = set(), False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("```"):
                in_code = not in_code
            elif not in_code and line.startswith("#"):
                found.add(slug(line.lstrip("#")))
    return found


def options(binary):
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=10).stdout
    return sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", out)))


def metrics(root):
    with open(os.path.join(root, "daemon", "metrics_render.c"), encoding="utf-8") as f:
        src = f.read()
    return sorted(set(re.findall(r'(?:head|scalar)\(\s*b,\s*"([a-z_]+)"', src)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    ap.add_argument("--binary", default=None)
    ap.add_argument("--man", default=None, help="the generated imdsd(8) to render")
    a = ap.parse_args()
    root = os.path.abspath(a.root)
    binary = a.binary or os.path.join(root, "build", "imdsd")
    problems = []
    checks = 0

    docs = [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))
    reference = "\n".join(open(p, encoding="utf-8").read() for p in docs if os.path.exists(p))
    everything = markdown_files(root)

    for opt in options(binary):
        checks += 1
        if not re.search(r"(?<![\w-])" + re.escape(opt) + r"(?![\w-])", reference):
            problems.append(f"options: {opt} (imdsd --help) is in neither README.md nor docs/")
    for name in metrics(root):
        checks += 1
        if not re.search(r"(?<![\w])" + re.escape(name) + r"(?![\w])", reference):
            problems.append(f"metrics: {name} (daemon/metrics_render.c) is in neither README.md nor docs/")
    for md in everything:
        rel = os.path.relpath(md, root)
        with open(md, encoding="utf-8") as f:
            text = f.read()
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue
            checks += 1
            path, _, frag = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(md), path)) if path else md
            if not os.path.exists(dest):
                problems.append(f"links: {rel} links to {target}, which does not exist")
            elif frag and dest.endswith(".md") and frag not in anchors(dest):
                problems.append(f"links: {rel} links to {target}: no such heading in {os.path.relpath(dest, root)}")
        for p in TICKED.findall(text):
            p = p.rstrip(".,:;")
            if "/" not in p or p.split("/")[0] not in TOP_DIRS or re.search(r"[<>$={}]|\.\.\.", p):
                continue
            checks += 1
            if not glob.glob(os.path.join(root, p)):
                problems.append(f"paths: {rel} names `{p}`, which does not exist")
    named = [os.path.basename(p) for p in glob.glob(os.path.join(root, "container", "kubernetes", "*.yaml"))]
    named += [os.path.basename(p) for p in glob.glob(os.path.join(root, "systemd", "*"))]
    for name in sorted(named):
        checks += 1
        if name not in reference:
            problems.append(f"units: {name} is described in neither README.md nor docs/")

    if a.man:
        checks += 1
        env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8")
        r = subprocess.run(["man", "--warnings", "-l", a.man], capture_output=True, text=True, env=env,
                           timeout=30)
        missing = [o for o in options(binary) if o not in r.stdout.replace("\u2010", "-")]
        if r.returncode != 0 or r.stderr.strip() or missing:
            problems.append(f"man: {a.man} does not render cleanly with man -l (status {r.returncode}, "
                            f"{r.stderr.strip()[:200]!r}, options missing: {missing})")
    for p in problems:
        print(p)
    print(f"docs: {checks - len(problems)} passed, {len(problems)} failed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
