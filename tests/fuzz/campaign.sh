#!/bin/bash
# campaign.sh SECONDS TARGET... - a long fuzzing run per target, one after the other, each on its
# own growing work corpus (build/fuzz/campaign-NAME, seeded from tests/fuzz/corpus/NAME).
#
# Every run appends one line to tests/fuzz/campaign.tsv: when, the commit fuzzed, the target, the
# CPU seconds it used (user + system, measured, not the wall time), executions, libFuzzer's edge
# coverage and features, the corpus size, and the result. Totals per target: tests/fuzz/totals.sh.
# Run it with nice so that it takes only idle CPU:  nice -n 19 tests/fuzz/campaign.sh 3600 build/fuzz/fuzz_jwt
set -u
secs=$1
shift
ledger=tests/fuzz/campaign.tsv
[ -s "$ledger" ] || printf 'date\tcommit\ttarget\tcpu_s\texecs\tcov\tft\tcorpus\tresult\n' >"$ledger"
rev=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
[ -z "$(git status --porcelain -- daemon include tests/fuzz/*.c 2>/dev/null)" ] || rev=$rev-dirty
status=0
for t in "$@"; do
    name=${t##*/fuzz_}
    work=build/fuzz/campaign-$name
    log=build/fuzz/campaign-$name.log
    mkdir -p "$work" build/fuzz/artifacts
    # CPU time of this run alone: the children's totals before and after (bash `times`)
    times >build/fuzz/times.$$ # in this shell: a $(...) subshell would not see its children
    before=$(sed -n 2p build/fuzz/times.$$)
    "$t" -max_total_time="$secs" -max_len=8192 -timeout=10 -rss_limit_mb=1024 -detect_leaks=1 \
        -artifact_prefix=build/fuzz/artifacts/ -print_final_stats=1 "$work" "tests/fuzz/corpus/$name" \
        >"$log" 2>&1
    rc=$?
    times >build/fuzz/times.$$
    after=$(sed -n 2p build/fuzz/times.$$)
    rm -f build/fuzz/times.$$
    cpu=$(
        python3 - "$before" "$after" <<'EOF'
import re, sys
def secs(line):
    return sum(float(m) * 60 + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", line))
print(round(secs(sys.argv[2]) - secs(sys.argv[1])))
EOF
    )
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*')
    ft=$(grep -o 'ft: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*')
    corpus=$(find "$work" -type f | wc -l)
    # 72: libFuzzer stopped by SIGINT (its -interrupted_exitcode), the run cut short, not a find
    if [ "$rc" -eq 0 ]; then result=ok; elif [ "$rc" -eq 72 ] && grep -q 'run interrupted' "$log"; then
        result=interrupted
    else
        result="FAIL($rc)"
        status=1
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$rev" "fuzz_$name" "$cpu" \
        "${execs:-0}" "${cov:-0}" "${ft:-0}" "$corpus" "$result" >>"$ledger"
    echo "fuzz_$name: $result, ${cpu} CPU s, ${execs:-0} execs, cov ${cov:-0}"
    [ "$rc" -eq 0 ] || tail -n 40 "$log"
done
exit $status
