"""pytest set-up for the imdsd integration suite: the real binary against the stand-in Entra.

Every test that takes the `ctx` fixture runs once per build variant:
  plain     build/imdsd         the release binary
  asan      build/asan/imdsd    ASan + UBSan (sanitizer reports fail the test)
  valgrind  build/debug/imdsd   under valgrind (memcheck errors and leaked descriptors fail the test);
            only the modules in VALGRIND_MODULES unless --valgrind-all
Options: --variants plain,asan,valgrind (default: all three), --valgrind-all, --keep (keep the artefact
directory). The usual pytest options work (-k, -x, --lf, -n N with pytest-xdist, --junitxml).
The last line of the run is "integration: N passed, N failed" (skips are neither).
"""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import harness  # noqa: E402

VARIANTS = {
    "plain": dict(binary="build/imdsd", label="", valgrind=False, scale=1.0),
    "asan": dict(binary="build/asan/imdsd", label="asan", valgrind=False, scale=2.0),
    "valgrind": dict(binary="build/debug/imdsd", label="valgrind", valgrind=True, scale=10.0),
}
# What make check runs under valgrind (make check-full: every module). The main path, the token
# file and the limits cover the request path, the cache, the watcher and connection handling.
VALGRIND_MODULES = ("test_main_path", "test_token_file", "test_limits", "test_pipelining", "test_token_proxy")
DEFAULT_TIMEOUT = 45   # seconds per test before the variant's scale; a test may set fn.timeout


def pytest_addoption(parser):
    g = parser.getgroup("imdsd")
    g.addoption("--variants", default="plain,asan,valgrind",
                help="build variants to run each test against (comma-separated: plain, asan, valgrind)")
    g.addoption("--valgrind-all", action="store_true", help="every module under valgrind, not only "
                + ", ".join(VALGRIND_MODULES))
    g.addoption("--keep", action="store_true", help="keep the artefact directory")


def selected_variants(config):
    names = [v.strip() for v in config.getoption("--variants").split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise pytest.UsageError(f"--variants: unknown {bad} (plain, asan, valgrind)")
    return names


def pytest_configure(config):
    for name in selected_variants(config):
        path = os.path.join(ROOT, VARIANTS[name]["binary"])
        if not os.access(path, os.X_OK):
            raise pytest.UsageError(f"{path}: not built (make {VARIANTS[name]['binary']})")


def pytest_generate_tests(metafunc):
    if "ctx" not in metafunc.fixturenames:
        return
    module = metafunc.module.__name__
    full = metafunc.config.getoption("--valgrind-all")
    only = getattr(metafunc.module, "ONLY_VARIANTS", None)   # e.g. the image tests: its own binary
    params = [v for v in selected_variants(metafunc.config)
              if (v != "valgrind" or full or module in VALGRIND_MODULES) and (only is None or v in only)]
    if not params:   # e.g. --variants asan for the image tests, or valgrind for a module it skips
        params = [pytest.param(None, marks=pytest.mark.skip(reason="no selected variant runs this module"))]
    metafunc.parametrize("variant", params)


def pytest_collection_modifyitems(config, items):
    for item in items:
        variant = getattr(item, "callspec", None) and item.callspec.params.get("variant")
        scale = VARIANTS[variant]["scale"] if variant else 1.0
        base = getattr(getattr(item, "function", None), "timeout", DEFAULT_TIMEOUT)
        item.add_marker(pytest.mark.timeout(base * scale))
    # the slow variant first, so that a parallel run does not end waiting for it
    items.sort(key=lambda it: 0 if "[valgrind]" in it.nodeid else 1)


# ---- per worker: artefacts, certificates and the stand-in Entra instances ------------------------

@pytest.fixture(scope="session")
def rundir(request):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    d = tempfile.mkdtemp(prefix=f"imdsd-it-{worker}-")
    os.chmod(d, 0o755)   # daemons that run as an unprivileged user (harness.NOBODY) read files here
    yield d
    if request.config.getoption("--keep") or request.session.testsfailed:
        print(f"\n# artefacts kept in {d}")
    else:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def fakes(rundir):
    certdir = os.path.join(rundir, "certs")
    subprocess.run(["sh", os.path.join(HERE, "gen_certs.sh"), certdir], check=True, stdout=subprocess.DEVNULL)
    certs = {f: os.path.join(certdir, f) for f in os.listdir(certdir)}
    running = {}
    try:
        for name, leaf in (("good", "leaf"), ("wronghost", "wronghost"), ("rogue", "rogue")):
            running[name] = harness.Fake(rundir, name, certs[f"{leaf}.pem"], certs[f"{leaf}.key"])
        yield certs, running
    finally:
        for d in harness.LIVE:
            d.kill()
        for f in running.values():
            f.stop()


@pytest.fixture
def ctx(request, variant, rundir, fakes):
    """A fresh harness.Ctx: the variant's binary, a temp dir, unique tenants; the daemons it started
    are stopped (and their sanitizer / valgrind output checked) after the test."""
    v = VARIANTS[variant]
    harness.BINARY = harness.reachable_by_all(os.path.join(ROOT, v["binary"]))
    harness.LABEL = v["label"]
    harness.VALGRIND = v["valgrind"]
    harness.SCALE = v["scale"]
    certs, running = fakes
    name = request.node.name.replace("[", "-").replace("]", "")
    tmp = os.path.join(rundir, name)
    os.makedirs(tmp)
    # the name makes the tenants at the shared stand-in Entra unique per test and variant
    c = harness.Ctx(f"{request.node.originalname}_{variant}", tmp, certs, running)
    request.node._imdsd_ctx = c
    yield c
    errors = c.finish()
    if errors:
        pytest.fail("; ".join(errors), pytrace=False)


# ---- reporting -------------------------------------------------------------------------------------

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    c = getattr(item, "_imdsd_ctx", None)
    if rep.failed and c is not None and rep.when in ("call", "teardown"):
        tail = c.log_tail()
        if tail:
            rep.sections.append(("imdsd stderr", tail))


# what the summary line counts (in the controlling process; workers report to it)
PASSED, FAILED = set(), set()
BROKEN = []   # the run ended abnormally (nothing collected, interrupted, internal error)


def pytest_runtest_logreport(report):
    """Counts each test once: failed if any phase failed, passed if its call passed."""
    if report.failed:
        FAILED.add(report.nodeid)
    elif report.when == "call" and report.passed:
        PASSED.add(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if exitstatus not in (0, 1):
        BROKEN.append(exitstatus)


def pytest_unconfigure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    failed = len(FAILED) or len(BROKEN)   # a broken run must not look like success
    sys.stdout.write(f"integration: {len(PASSED - FAILED)} passed, {failed} failed\n")
    sys.stdout.flush()
