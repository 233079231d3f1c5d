#!/bin/sh
# make check: lint, unit tests (plain, ASan+UBSan, valgrind), make coverage (a report: it fails
# only if a test fails under it), a short fuzz of each target, the integration suite against the
# real binary (plain, ASan+UBSan, and valgrind for the modules in
# tests/integration/conftest.py VALGRIND_MODULES, or every module with --full), the bench smoke;
# with --full also tests/check_systemd.py (make check-systemd: the units under a real systemd).
# Ends with one "check: N passed, N failed" line. Expects the builds (make check-build).
set -u
cd "$(dirname "$0")/.."
PY=/usr/bin/python3
full=""
[ "${1:-}" = "--full" ] && full="--valgrind-all"
jobs=$(($(nproc 2>/dev/null || echo 2) * 2))
total_pass=0
total_fail=0
t_start=$(date +%s)
step() {
    name=$1
    shift
    echo "== $name"
    t0=$(date +%s)
    out=$(mktemp)
    "$@" 2>&1 | tee "$out"
    # the step's closing "N passed, N failed" line (an optional "word:" may precede it)
    p=$(tail -n 1 "$out" | sed -n 's/^\([a-z-]*: \)\{0,1\}\([0-9][0-9]*\) passed, \([0-9][0-9]*\) failed$/\2/p')
    f=$(tail -n 1 "$out" | sed -n 's/^\([a-z-]*: \)\{0,1\}\([0-9][0-9]*\) passed, \([0-9][0-9]*\) failed$/\3/p')
    if [ -z "$p" ]; then
        p=0
        f=1
        echo "$name: produced no summary line (counted as a failure)"
    fi
    total_pass=$((total_pass + p))
    total_fail=$((total_fail + f))
    echo "== $name: $(($(date +%s) - t0)) s"
    rm -f "$out"
}
step "lint (clang-format)" sh -c 'make --no-print-directory lint && echo "lint: 1 passed, 0 failed" || echo "lint: 0 passed, 1 failed"'
step "unit tests (plain, asan, valgrind)" tests/run-unit.sh build build/asan build/debug
step "coverage (a report: build/cov/report.txt, fuzz.txt, html/; full output build/coverage.log)" sh -c '
    if make --no-print-directory coverage >build/coverage.log 2>&1; then r="1 passed, 0 failed"
    else tail -n 30 build/coverage.log; r="0 passed, 1 failed"; fi
    grep -E "^TOTAL|^coverage: [0-9]|PASS$|below target" build/coverage.log; echo "coverage: $r"'
step "fuzz smoke (seed corpora + ${FUZZ_SECONDS:-10} s per target)" make --no-print-directory fuzz-smoke
step "integration (plain, asan+ubsan, valgrind${full:+ for every module}; $jobs at a time)" \
    $PY -m pytest tests/integration -q -n "$jobs" $full --durations=8 --junitxml=build/integration.xml
step "bench smoke (runs, every answer 200; figures only in make bench)" make --no-print-directory bench-smoke
# --full: imdsd under a real systemd (a Debian 12 root booted by systemd-nspawn; make check-systemd)
[ -n "$full" ] && step "systemd (make install in a booted Debian 12 root, the quick start)" \
    $PY tests/check_systemd.py
echo "== make check took $(($(date +%s) - t_start)) s after the build"
echo "check: $total_pass passed, $total_fail failed"
[ "$total_fail" -eq 0 ]
