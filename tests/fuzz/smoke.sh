#!/bin/sh
# smoke.sh SECONDS TARGET... - replay each target's seed corpus, then fuzz it for SECONDS.
# A new crash fails the run; the crashing input is left in build/fuzz/ as crash-*.
set -u
secs=$1
shift
pass=0
fail=0
for t in "$@"; do
    name=${t##*/fuzz_}
    seeds=tests/fuzz/corpus/$name
    work=build/fuzz/corpus-$name
    mkdir -p "$work"
    if "$t" -max_total_time="$secs" -max_len=8192 -timeout=10 -rss_limit_mb=1024 \
        -artifact_prefix=build/fuzz/ -print_final_stats=1 "$work" "$seeds" >build/fuzz/$name.log 2>&1; then
        pass=$((pass + 1))
        echo "ok   fuzz_$name ($(grep -o 'stat::number_of_executed_units: *[0-9]*' build/fuzz/$name.log | grep -o '[0-9]*$') runs)"
    else
        fail=$((fail + 1))
        echo "FAIL fuzz_$name"
        tail -n 30 build/fuzz/$name.log
    fi
done
echo "fuzz: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
