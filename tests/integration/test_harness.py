"""The harness itself: the facade re-exports every public helper, and the build variant conftest.py sets
through it (harness.BINARY = ...) is the one the helpers in the other modules run, not a stale copy."""
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import harness_base  # noqa: E402
import harness_ctx  # noqa: E402
import harness_daemon  # noqa: E402
import harness_http  # noqa: E402
import harness_netns  # noqa: E402
import harness_tokens  # noqa: E402

MODULES = (harness_base, harness_ctx, harness_daemon, harness_http, harness_netns, harness_tokens)


def test_facade_reexports_every_public_name():
    for m in MODULES:
        for name, value in vars(m).items():
            if name.startswith("_") or isinstance(value, types.ModuleType):
                continue
            assert name in harness.__all__, f"{m.__name__}.{name} is not re-exported by harness"
            if name not in harness.VARIANT_STATE:
                assert getattr(harness, name) is value, f"harness.{name} is not {m.__name__}.{name}"
    for name in harness.__all__:
        assert hasattr(harness, name), name


def test_variant_state_is_forwarded():
    saved = {n: getattr(harness_base, n) for n in harness.VARIANT_STATE}
    try:
        harness.BINARY, harness.LABEL, harness.VALGRIND, harness.SCALE = "/nowhere/imdsd", "asan", True, 7.0
        assert (harness_base.BINARY, harness_base.LABEL, harness_base.VALGRIND, harness_base.SCALE) == \
            ("/nowhere/imdsd", "asan", True, 7.0)
        assert harness.BINARY == "/nowhere/imdsd" and harness.SCALE == 7.0
        cmd = harness_daemon.command(["--help"], "/tmp")
        assert cmd[0] == "valgrind" and cmd[-2:] == ["/nowhere/imdsd", "--help"], cmd
        assert "ASAN_OPTIONS" in harness_daemon.base_env()
        assert harness_ctx.Ctx("t", "/tmp", {}, {"good": None, "wronghost": None, "rogue": None}).scale == 7.0
        harness.LABEL, harness.VALGRIND = "", False
        assert harness_daemon.command(["--help"], "/tmp") == ["/nowhere/imdsd", "--help"]
        assert "ASAN_OPTIONS" not in harness_daemon.base_env()
    finally:
        for n, v in saved.items():
            setattr(harness, n, v)


def test_reexported_name_cannot_be_shadowed():
    try:
        harness.wait_for = None
    except AttributeError:
        pass
    else:
        raise AssertionError("harness.wait_for = ... was accepted")
    assert harness.wait_for is harness_base.wait_for


def test_every_name_the_tests_use_exists():
    """Each harness attribute the tests and tools name resolves (one the old single module had only
    by accident, such as one of its stdlib imports, would not)."""
    import glob
    import re
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    missing = []
    for path in glob.glob(os.path.join(tests, "**", "*.py"), recursive=True):
        if os.path.basename(path).startswith("harness") or path == os.path.abspath(__file__):
            continue
        with open(path) as f:
            text = f.read()
        for m in re.finditer(r"\bharness\.([A-Za-z_]\w*)\b(?!\.py)", text):
            if not hasattr(harness, m.group(1)):
                missing.append(f"{os.path.relpath(path, tests)}: harness.{m.group(1)}")
    assert not missing, missing
