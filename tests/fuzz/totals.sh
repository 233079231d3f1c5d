#!/bin/sh
# totals.sh - per target, the totals of tests/fuzz/campaign.tsv: runs, CPU time, executions, the
# highest edge coverage reached, and failed runs (crashes, leaks, timeouts; a run stopped by SIGINT
# is "interrupted", not failed).
printf "%-22s %5s %10s %14s %6s %8s\n" target runs "CPU h" executions cov crashes
awk -F'\t' 'NR > 1 {
    t = $3; runs[t]++; cpu[t] += $4; ex[t] += $5
    if ($6 > cov[t]) cov[t] = $6
    if ($9 ~ /^FAIL/) bad[t]++
}
END {
    for (t in runs)
        printf "%-22s %5d %10.2f %14d %6d %8d\n", t, runs[t], cpu[t] / 3600, ex[t], cov[t], bad[t] + 0
}' "${1:-tests/fuzz/campaign.tsv}" | sort
