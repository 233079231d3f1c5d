#!/bin/sh
# make check: unit tests (plain, ASan+UBSan, valgrind), then the integration suite against the
# real binary (plain, ASan+UBSan, valgrind). Ends with one "N passed, N failed" line.
set -u
cd "$(dirname "$0")/.."
PY=/usr/bin/python3
total_pass=0
total_fail=0
step() {
    name=$1
    shift
    echo "== $name"
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
    rm -f "$out"
}
step "lint (clang-format)" sh -c 'make --no-print-directory lint && echo "lint: 1 passed, 0 failed" || echo "lint: 0 passed, 1 failed"'
step "unit tests (plain, asan, valgrind)" tests/run-unit.sh build build/asan build/debug
step "fuzz smoke (seed corpora + ${FUZZ_SECONDS:-10} s per target)" make --no-print-directory fuzz-smoke
step "integration (plain)" $PY tests/integration/run.py --binary build/imdsd
step "bench smoke (runs, every answer 200; figures only in make bench)" make --no-print-directory bench-smoke
step "integration (asan+ubsan)" $PY tests/integration/run.py --binary build/asan/imdsd --label asan
step "integration (valgrind)" $PY tests/integration/run.py --binary build/debug/imdsd --label valgrind --valgrind
echo "check: $total_pass passed, $total_fail failed"
[ "$total_fail" -eq 0 ]
