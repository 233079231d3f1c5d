#!/bin/sh
# minimize.sh TARGET... - fold what a campaign found (build/fuzz/campaign-NAME) into the committed
# corpus tests/fuzz/corpus/NAME. libFuzzer's -merge=1 adds only the inputs that reach a feature the
# corpus does not reach yet, smallest first, so the corpus stays minimal and the hand-written seeds
# (named for what they are) stay. Features are edges only (-use_counters=0): one input per new edge,
# not one per new hit-count bucket, which would keep thousands.
set -eu
for t in "$@"; do
    name=${t##*/fuzz_}
    seeds=tests/fuzz/corpus/$name
    mkdir -p "$seeds" "build/fuzz/campaign-$name"
    before=$(find "$seeds" -type f | wc -l)
    "$t" -merge=1 -use_counters=0 -max_len=8192 -timeout=10 -rss_limit_mb=1024 "$seeds" "build/fuzz/campaign-$name" \
        >"build/fuzz/minimize-$name.log" 2>&1
    echo "fuzz_$name: $before -> $(find "$seeds" -type f | wc -l) inputs, $(du -sb "$seeds" | cut -f1) bytes"
done
