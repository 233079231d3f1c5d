#!/bin/sh
# smoke.sh SECONDS TARGET... - replay each target's seed corpus, then fuzz it for SECONDS, as many
# targets at once as there are cores. A new crash fails the run; the crashing input is left in
# build/fuzz/ as crash-* (or leak-*, timeout-*).
set -u
secs=$1
shift
jobs=$(nproc 2>/dev/null || echo 2)
mkdir -p build/fuzz
run() {
    name=${1##*/fuzz_}
    work=build/fuzz/corpus-$name
    mkdir -p "$work"
    if "$1" -max_total_time="$secs" -max_len=8192 -timeout=10 -rss_limit_mb=1024 \
        -artifact_prefix=build/fuzz/ -print_final_stats=1 "$work" "tests/fuzz/corpus/$name" \
        >"build/fuzz/$name.log" 2>&1; then
        echo ok >"build/fuzz/$name.result"
    else
        echo FAIL >"build/fuzz/$name.result"
    fi
}
running=0
for t in "$@"; do
    if [ "$running" -ge "$jobs" ]; then
        wait
        running=0
    fi
    run "$t" &
    running=$((running + 1))
done
wait
pass=0
fail=0
for t in "$@"; do
    name=${t##*/fuzz_}
    if [ "$(cat "build/fuzz/$name.result" 2>/dev/null)" = ok ]; then
        pass=$((pass + 1))
        echo "ok   fuzz_$name ($(grep -o 'stat::number_of_executed_units: *[0-9]*' "build/fuzz/$name.log" | grep -o '[0-9]*$') runs)"
    else
        fail=$((fail + 1))
        echo "FAIL fuzz_$name"
        tail -n 30 "build/fuzz/$name.log"
    fi
done
echo "fuzz: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
