#!/bin/sh
# Runs every unit test binary of each build variant given (build, build/asan, build/debug =
# under valgrind). Prints one line per binary and "N passed, N failed" last.
set -u
pass=0
fail=0
for dir in "$@"; do
    for t in "$dir"/unit/test_*; do
        [ -x "$t" ] || continue
        case "$dir" in
        */debug) run="valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite --track-fds=yes" ;;
        */asan) run="env ASAN_OPTIONS=abort_on_error=1:detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1" ;;
        *) run="" ;;
        esac
        log=$(mktemp)
        if timeout 300 $run "$t" >"$log" 2>&1; then
            pass=$((pass + 1))
            echo "ok   $t ($(grep -c '^\[       OK \]' "$log") cases)"
        else
            fail=$((fail + 1))
            echo "FAIL $t"
            tail -n 40 "$log"
        fi
        rm -f "$log"
    done
done
echo "unit: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
