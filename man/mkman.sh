#!/bin/sh
# mkman.sh BINARY TEMPLATE - writes the imdsd(8) man page on stdout: TEMPLATE (hand-written roff)
# with @OPTIONS@ replaced by BINARY --help turned into roff, and @VERSION@ by its --version. The
# options thus have one source, the binary's own --help, and the page cannot drift from it.
# A small script of our own rather than help2man: no extra build dependency for one page.
# The date is SOURCE_DATE_EPOCH's when set (reproducible builds), else left out.
set -eu
bin=$1
template=$2
help=$("$bin" --help)
version=$("$bin" --version | awk '{print $2}')
date=""
[ -n "${SOURCE_DATE_EPOCH:-}" ] && date=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%d)

# --help: "Usage:" and the summary up to the first blank line (the template says the same), then
# the options ("  --name ARG   text", continuation lines indented), then closing paragraphs.
options=$(printf '%s\n' "$help" | awk '
    # roff-safe text: backslashes, a leading control character, "-" in option names as "\-"
    # (a real minus: copy-pasteable), runs of blanks (column padding in --help) as one
    function esc(s,    out, opt) {
        gsub(/\\/, "\\e", s)
        gsub(/  +/, " ", s)
        out = ""
        while (match(s, /--[a-z0-9][a-z0-9-]*/)) {
            opt = substr(s, RSTART, RLENGTH)
            gsub(/-/, "\\-", opt)
            out = out substr(s, 1, RSTART - 1) opt
            s = substr(s, RSTART + RLENGTH)
        }
        s = out s
        sub(/^[.\047]/, "\\\\\\&&", s)
        return s
    }
    # "--listen ADDR:PORT" -> bold name, italic argument; "--help, --version" -> both bold
    function head(s,    n, w, i, out, comma) {
        n = split(s, w, " ")
        out = ""
        for (i = 1; i <= n; i++) {
            if (w[i] ~ /^--/) {
                comma = sub(/,$/, "", w[i])
                out = out (i > 1 ? " " : "") "\\fB" esc(w[i]) "\\fR" (comma ? "," : "")
            } else {
                out = out " \\fI" esc(w[i]) "\\fR"
            }
        }
        return out
    }
    state == 0 { if ($0 == "") state = 1; next }
    state == 1 && /^  --/ {
        line = substr($0, 3)
        split_at = match(line, /  +/)
        text = substr(line, split_at + RLENGTH)
        print ".TP"
        if (split_at) {
            print head(substr(line, 1, split_at - 1))
            print esc(text)
        } else {
            print head(line)
        }
        next
    }
    state == 1 && /^    / { sub(/^ +/, ""); print esc($0); next }
    state == 1 && $0 == "" { state = 2; print ".PP"; next }
    state == 1 { print ".PP"; print esc($0); state = 2; next }
    state == 2 { if ($0 == "") print ".PP"; else print esc($0) }
')

OPTIONS_ROFF=$options awk -v version="$version" -v date="$date" '
    $0 == "@OPTIONS@" { print ENVIRON["OPTIONS_ROFF"]; next }
    { gsub(/@VERSION@/, version); gsub(/@DATE@/, date); print }
' "$template"
