#!/bin/sh
# Runs every unit test binary of each build variant given (build, build/asan, build/debug =
# under valgrind), twice as many at a time as there are cores (several wait on real timers).
# Prints one line per binary, in order, and "N passed, N failed" last.
set -u
pass=0
fail=0
jobs=$(($(nproc 2>/dev/null || echo 2) * 2))
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
n=0
for dir in "$@"; do
    for t in "$dir"/unit/test_*; do
        [ -x "$t" ] || continue
        case "$dir" in
        */debug) run="valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite --track-fds=yes" ;;
        */asan) run="env ASAN_OPTIONS=abort_on_error=1:detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1" ;;
        *) run="" ;;
        esac
        n=$((n + 1))
        echo "$t" >"$out/$n.name"
        (
            timeout 300 $run "$t" >"$out/$n.log" 2>&1
            echo $? >"$out/$n.rc"
        ) &
        while [ "$(jobs -p | wc -l)" -ge "$jobs" ]; do
            sleep 0.05
        done
    done
done
wait
i=0
while [ "$i" -lt "$n" ]; do
    i=$((i + 1))
    t=$(cat "$out/$i.name")
    if [ "$(cat "$out/$i.rc" 2>/dev/null)" = 0 ]; then
        pass=$((pass + 1))
        echo "ok   $t ($(grep -c '^\[       OK \]' "$out/$i.log") cases)"
    else
        fail=$((fail + 1))
        echo "FAIL $t"
        tail -n 40 "$out/$i.log"
    fi
done
echo "unit: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
