#!/bin/sh
# coverage.sh "UNITS" "FUZZ" "OBJECTS" "SOURCES" - make coverage, once the Makefile has built the
# instrumented binaries (clang -fprofile-instr-generate -fcoverage-mapping) in build/cov/:
#   runs every unit test binary of UNITS (at the same time), and every fuzz target of FUZZ (built
#   with tests/fuzz/replay.c) on its committed corpus tests/fuzz/corpus/NAME, each run writing its
#   counts to build/cov/prof/<binary>/;
#   build/cov/report.txt  llvm-cov report of the merged counts over SOURCES (daemon/*.c), per file;
#                         OBJECTS (every daemon/ object) make files that no test links show as 0%
#   build/cov/html/       llvm-cov show, the same as HTML (index.html)
#   build/cov/fuzz.txt    each fuzz target's corpus alone, over the daemon/ files that target links
# then the line coverage of each COVERAGE_PURE module against COVERAGE_MIN (%). Exits 1 if a unit
# test or a replay failed (the reports are still written), or with COVERAGE_STRICT=1 if a pure
# module is below COVERAGE_MIN; 0 otherwise.
set -u
units=$1
fuzz=$2
objects=$3
sources=$4
: "${LLVM_PROFDATA:=llvm-profdata}" "${LLVM_COV:=llvm-cov}" "${COVERAGE_MIN:=90}"
: "${COVERAGE_STRICT:=0}" "${COVERAGE_PURE:=json form imds entra_msg jwt refresh proxy config}"
out=build/cov
prof=$out/prof
start=$(date +%s)

for tool in "$LLVM_PROFDATA" "$LLVM_COV"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "coverage: $tool not found: run 'make deps' (Debian package llvm)" >&2
        exit 1
    fi
done
rm -rf "$prof" "$out/html" "$out/report.txt" "$out/fuzz.txt"
mkdir -p "$prof"
failed=0

# (a) the unit tests, all at once (most of the time is test_https_client's and test_token_cache's
# waits); each binary's counts in its own directory, one file per process (%p)
pids=
for t in $units; do
    name=${t##*/}
    mkdir -p "$prof/$name"
    LLVM_PROFILE_FILE="$prof/$name/%p-%m.profraw" timeout 300 "$t" >"$prof/$name.log" 2>&1 &
    pids="$pids $!:$t"
done
nunits=0
for p in $pids; do
    nunits=$((nunits + 1))
    if ! wait "${p%%:*}"; then
        failed=$((failed + 1))
        echo "coverage: FAIL ${p#*:}"
        tail -n 40 "$prof/${p##*/}.log"
    fi
done

# (b) each fuzz target replaying its committed corpus
ninputs=0
for f in $fuzz; do
    name=${f##*/}
    corpus=tests/fuzz/corpus/${name#fuzz_}
    mkdir -p "$prof/$name"
    if [ ! -d "$corpus" ]; then
        echo "coverage: $name has no corpus ($corpus): 0 inputs"
        set --
    else
        set -- "$corpus"
    fi
    if LLVM_PROFILE_FILE="$prof/$name/%p-%m.profraw" timeout 300 "$f" "$@" >"$prof/$name.log" 2>&1; then
        n=$(sed -n 's/^replay: \([0-9]*\) inputs$/\1/p' "$prof/$name.log")
        ninputs=$((ninputs + ${n:-0}))
    else
        failed=$((failed + 1))
        echo "coverage: FAIL $name on $corpus"
        tail -n 40 "$prof/$name.log"
    fi
done

# every object once: the first as the binary, the others with -object
objargs() {
    first=1
    for o in "$@"; do
        if [ $first = 1 ]; then
            printf '%s\n' "$o"
            first=0
        else
            printf -- '-object\n%s\n' "$o"
        fi
    done
}
# the column layout the parsing below expects (regions, functions, lines, branches)
cols="--show-region-summary=true --show-branch-summary=true --show-instantiation-summary=false --use-color=false"

# shellcheck disable=SC2086
"$LLVM_PROFDATA" merge -sparse -o "$prof/all.profdata" "$prof"/*/*.profraw || exit 1
# shellcheck disable=SC2046,SC2086
"$LLVM_COV" report $cols -instr-profile="$prof/all.profdata" $(objargs $units $fuzz $objects) \
    $sources >"$out/report.txt" 2>"$prof/report.err" || {
    cat "$prof/report.err" >&2
    exit 1
}
# shellcheck disable=SC2046,SC2086
"$LLVM_COV" show -format=html -output-dir="$out/html" -show-line-counts-or-regions \
    -instr-profile="$prof/all.profdata" $(objargs $units $fuzz $objects) $sources \
    2>"$prof/show.err" || {
    cat "$prof/show.err" >&2
    exit 1
}
# llvm-cov's "N functions have mismatched data": daemon functions that a test binary replaces with
# its own of the same name (test_token_cache's entra_fetch, ...), and main. When no run executed
# the daemon's own, llvm-cov leaves it out of its file's figures: named here instead of the warning.
sed "s/$(printf '\033')\[[0-9;]*m//g" "$prof/report.err" "$prof/show.err" |
    grep -v -e 'mismatched data' -e '^$' >&2
if grep -q 'mismatched data' "$prof/report.err"; then
    # shellcheck disable=SC2046,SC2086
    names=$("$LLVM_COV" report -dump -instr-profile="$prof/all.profdata" \
        $(objargs $units $fuzz $objects) $sources 2>&1 >/dev/null |
        sed -n "s/^hash-mismatch: No profile record found for '\(.*\)' with .*/ \1/p" | sort -u |
        tr -d '\n')
    echo "left out of the figures (test binaries define their own of that name; none runs the" \
        "daemon's):$names" >>"$out/report.txt"
fi

# each fuzz target alone: a line per target, then each target's files
for f in $fuzz; do
    name=${f##*/}
    : >"$prof/$name.report"
    ls "$prof/$name"/*.profraw >/dev/null 2>&1 || continue # it crashed: no counts
    # shellcheck disable=SC2086
    "$LLVM_PROFDATA" merge -sparse -o "$prof/$name.profdata" "$prof/$name"/*.profraw || exit 1
    # shellcheck disable=SC2086
    "$LLVM_COV" report $cols -instr-profile="$prof/$name.profdata" "$f" $sources \
        >"$prof/$name.report" 2>/dev/null || exit 1
done
{
    echo "Each fuzz target's committed corpus alone, line coverage over the daemon/ files it links"
    printf '%-24s %7s %6s %7s %9s\n' target inputs files lines cover
    for f in $fuzz; do
        name=${f##*/}
        n=$(sed -n 's/^replay: \([0-9]*\) inputs$/\1/p' "$prof/$name.log")
        awk -v t="$name" -v n="${n:-0}" '/\.c / { files++ }
            /^TOTAL/ { printf "%-24s %7s %6s %7s %9s\n", t, n, files, $(NF-5), $(NF-3); done = 1 }
            END { if (!done) printf "%-24s %7s  no counts (it failed)\n", t, n }' "$prof/$name.report"
    done
    for f in $fuzz; do
        name=${f##*/}
        echo
        echo "$name:"
        awk '/\.c / { printf "  %-22s %7s %9s\n", $1, $(NF-5), $(NF-3) }' "$prof/$name.report"
    done
} >"$out/fuzz.txt"

cat "$out/report.txt"
echo
cat "$out/fuzz.txt"
echo
echo "coverage: $nunits unit test binaries and $(echo "$fuzz" | wc -w) fuzz targets ($ninputs corpus inputs) in $(($(date +%s) - start)) s"
echo "coverage: build/cov/report.txt, build/cov/fuzz.txt, build/cov/html/index.html"

# the pure modules against the target
below=0
echo "coverage: pure modules, line coverage (target ${COVERAGE_MIN}%):"
for m in $COVERAGE_PURE; do
    pct=$(awk -v f="$m.c" '$1 == f || $1 ~ ("/" f "$") { print $(NF-3) }' "$out/report.txt")
    if [ -z "$pct" ]; then
        printf '  %-14s %8s  below target (no test links it)\n' "$m.c" -
        below=$((below + 1))
    elif awk -v p="${pct%\%}" -v m="$COVERAGE_MIN" 'BEGIN { exit !(p + 0 >= m + 0) }'; then
        printf '  %-14s %8s  PASS\n' "$m.c" "$pct"
    else
        printf '  %-14s %8s  below target\n' "$m.c" "$pct"
        below=$((below + 1))
    fi
done
echo "coverage: $below of $(echo "$COVERAGE_PURE" | wc -w) pure modules below ${COVERAGE_MIN}%; $failed runs failed"
[ "$failed" -eq 0 ] || exit 1
[ "$COVERAGE_STRICT" = 1 ] && [ "$below" -gt 0 ] && exit 1
exit 0
