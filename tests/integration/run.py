#!/usr/bin/python3
"""run.py - runs the imdsd integration tests against a built binary.

  /usr/bin/python3 tests/integration/run.py --binary build/imdsd [--label asan] [--valgrind] [-k PATTERN]

Every function named test_* in tests/integration/test_*.py runs in order (files sorted, functions in
source order) with a fresh harness.Ctx. One line per test, then "N passed, N failed" as the last
line; exit status 1 if any test failed. Artefacts (fake logs, daemon stderr) stay in the printed
directory when something fails or with --keep.
"""
import argparse, glob, importlib, os, re, shutil, signal, subprocess, sys, tempfile, time, traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402

DEFAULT_TIMEOUT = 45  # seconds per test, before SCALE; a test may set fn.timeout


class TestTimeout(Exception):
    pass


def on_alarm(signum, frame):
    raise TestTimeout("test timed out")


def on_term(signum, frame):
    raise KeyboardInterrupt()


def discover(pattern):
    tests = []
    for path in sorted(glob.glob(os.path.join(HERE, "test_*.py"))):
        mod = importlib.import_module(os.path.basename(path)[:-3])
        for name, fn in vars(mod).items():
            if name.startswith("test_") and callable(fn) and getattr(fn, "__module__", "") == mod.__name__:
                full = f"{mod.__name__}.{name}"
                if pattern is None or re.search(pattern, full):
                    tests.append((name, fn))
    return tests


def reason_of(e):
    if isinstance(e, AssertionError):
        msg = str(e) or "assertion failed"
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f for f in reversed(tb) if os.path.basename(f.filename).startswith("test_")), tb[-1])
        return f"{msg} [{os.path.basename(where.filename)}:{where.lineno}]"
    return f"{type(e).__name__}: {e} [{traceback.format_exc().strip().splitlines()[-3].strip()}]"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--label", default="")
    ap.add_argument("--valgrind", action="store_true")
    ap.add_argument("-k", dest="pattern", help="only tests whose module.name matches this regular expression")
    ap.add_argument("--keep", action="store_true", help="keep the artefact directory")
    a = ap.parse_args()
    if not os.access(a.binary, os.X_OK):
        print(f"run.py: {a.binary}: not an executable file", file=sys.stderr)
        return 2
    harness.BINARY = os.path.abspath(a.binary)
    harness.LABEL = a.label
    harness.VALGRIND = a.valgrind
    harness.SCALE = 10.0 if a.valgrind else (2.0 if a.label == "asan" else 1.0)
    tests = discover(a.pattern)

    rundir = tempfile.mkdtemp(prefix=f"imdsd-it-{a.label or ('valgrind' if a.valgrind else 'plain')}-")
    fakes, passed, failed = {}, 0, 0
    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    try:
        certdir = os.path.join(rundir, "certs")
        subprocess.run(["sh", os.path.join(HERE, "gen_certs.sh"), certdir], check=True)
        certs = {f: os.path.join(certdir, f) for f in os.listdir(certdir)}
        for name, leaf in (("good", "leaf"), ("wronghost", "wronghost"), ("rogue", "rogue")):
            fakes[name] = harness.Fake(rundir, name, certs[f"{leaf}.pem"], certs[f"{leaf}.key"])
        label = f" [{a.label}]" if a.label else ""
        print(f"# imdsd integration: {len(tests)} tests, binary {a.binary}{label}"
              f"{' under valgrind' if a.valgrind else ''}, artefacts in {rundir}", flush=True)
        for name, fn in tests:
            tmp = os.path.join(rundir, name)
            os.makedirs(tmp)
            ctx = harness.Ctx(name, tmp, certs, fakes)
            t0, err, skipped = time.monotonic(), None, None
            signal.setitimer(signal.ITIMER_REAL, getattr(fn, "timeout", DEFAULT_TIMEOUT) * harness.SCALE)
            try:
                fn(ctx)
            except harness.Skip as e:
                skipped = str(e)
            except (AssertionError, Exception) as e:  # a test failure, whatever its kind
                err = reason_of(e)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            try:
                signal.setitimer(signal.ITIMER_REAL, 60 * harness.SCALE)
                stop_errors = ctx.finish()
            except TestTimeout:
                stop_errors = ["timed out stopping the daemons"]
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if stop_errors and (err is None or any("died" in e for e in stop_errors)):
                err = "; ".join(stop_errors) + (f" (the test saw: {err})" if err else "")
            elif stop_errors:
                err += " (also: " + "; ".join(stop_errors) + ")"
            dt = time.monotonic() - t0
            if skipped is not None and err is None:
                print(f"skip {name}: {skipped}", flush=True)
            elif err is None:
                passed += 1
                print(f"ok   {name} ({dt:.1f}s)", flush=True)
            else:
                failed += 1
                print(f"FAIL {name}: {err} ({dt:.1f}s)", flush=True)
                tail = ctx.log_tail()
                if tail:
                    print(tail, flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        failed += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for d in harness.LIVE:
            d.kill()
        for f in fakes.values():
            f.stop()
        if failed or a.keep:
            print(f"# artefacts kept in {rundir}", flush=True)
        else:
            shutil.rmtree(rundir, ignore_errors=True)
    print(f"{passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
