#!/usr/bin/env bash
# qemu-img vs `sluice img` on the same files, interleaved, on this machine.
#
# Images: a qcow2 chain, base.qcow2 (1 GiB of random data) under
# top.qcow2 (256 MiB of random data in 1 MiB pieces every 4 MiB).
# Timed, ROUNDS times each, the two tools alternating which goes first:
#   convert -O qcow2 (default and -W -m 16), convert -O raw,
#   compare (the chain against its flattened copy: every byte read),
#   check (the 1.25 GiB flattened qcow2), rebase -b "" (flattening a
#   copy of top.qcow2 in place), commit (of a copy of top into a copy of
#   base).
# Prints a Markdown table of median wall times and qemu-img/sluice ratios
# (above 1: sluice is faster).
#
# Usage: scripts/bench-img.sh [ROUNDS]   (BENCH_DIR sets the work dir)
# Run it on an otherwise quiet machine: it checks for running cargo.
set -euo pipefail

ROUNDS=${1:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${BENCH_DIR:-/tmp/sluice-bench-img}
SLUICE="$ROOT/target/release/sluice"

if pgrep -a cargo >/dev/null; then
    echo "warning: cargo is running; timings will be disturbed:" >&2
    pgrep -a cargo >&2 || true
fi
(cd "$ROOT" && cargo build --release -q -p sluice-cli)

mkdir -p "$DIR"
cd "$DIR"
if [ ! -f top.qcow2 ]; then
    echo "making images in $DIR ..." >&2
    head -c 1G /dev/urandom > rnd.raw
    qemu-img convert -f raw -O qcow2 rnd.raw base.qcow2
    rm -f rnd.raw
    head -c 1M /dev/urandom > piece.raw
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
    cmds=()
    for i in $(seq 0 255); do
        cmds+=(-c "write -s piece.raw $((i * 4))M 1M")
    done
    qemu-io -f qcow2 "${cmds[@]}" top.qcow2 >/dev/null
    qemu-img convert -O qcow2 top.qcow2 flat.qcow2
fi

# Cases that change their images run on fresh copies, made untimed:
#   rebase: ovl.qcow2 (a copy of top.qcow2 on base.qcow2) flattened with -b "";
#   commit: ctop.qcow2 committed into cbase.qcow2 (copies of both).
prepare() {
    case "$1" in
    rebase*)
        cp top.qcow2 ovl.qcow2
        qemu-img rebase -u -F qcow2 -b "$DIR/base.qcow2" ovl.qcow2 ;;
    commit*)
        cp base.qcow2 cbase.qcow2
        cp top.qcow2 ctop.qcow2
        qemu-img rebase -u -F qcow2 -b "$DIR/cbase.qcow2" ctop.qcow2 ;;
    esac
}

# run_case TOOL CASE: the command line of CASE for TOOL.
run_case() {
    local tool=$1 c=$2
    case "$c" in
    'rebase -b "" ovl.qcow2') $tool rebase -b "" ovl.qcow2 ;;
    # shellcheck disable=SC2086
    *) $tool $c ;;
    esac
}

# time_of TOOL CASE: wall seconds of one run (output discarded; failure
# aborts). Dirty pages of earlier runs are written back first (untimed),
# so that no run pays for another's writeback throttling.
time_of() {
    local t0 t1
    rm -f out.qcow2 out.raw
    prepare "$2"
    sync
    t0=$(date +%s.%N)
    run_case "$1" "$2" >/dev/null 2>&1 || { echo "failed: $*" >&2; exit 1; }
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc -l
}

median() {
    sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'
}

CASES=(
    "convert -O qcow2 top.qcow2 out.qcow2"
    "convert -O qcow2 -W -m 16 top.qcow2 out.qcow2"
    "convert -O raw top.qcow2 out.raw"
    "convert -O raw -W -m 16 top.qcow2 out.raw"
    "compare top.qcow2 flat.qcow2"
    "check flat.qcow2"
    'rebase -b "" ovl.qcow2'
    "commit ctop.qcow2"
)

declare -A Q S
for c in "${CASES[@]}"; do Q[$c]=""; S[$c]=""; done
for r in $(seq 1 "$ROUNDS"); do
    for c in "${CASES[@]}"; do
        # shellcheck disable=SC2086
        if (( r % 2 )); then
            q=$(time_of qemu-img "$c")
            s=$(time_of "$SLUICE img" "$c")
        else
            s=$(time_of "$SLUICE img" "$c")
            q=$(time_of qemu-img "$c")
        fi
        Q[$c]+="$q"$'\n'; S[$c]+="$s"$'\n'
    done
done
rm -f out.qcow2 out.raw ovl.qcow2 cbase.qcow2 ctop.qcow2

echo "| command (\`qemu-img\` / \`sluice img\`) | qemu-img s | sluice s | ratio |"
echo "| --- | ---: | ---: | ---: |"
for c in "${CASES[@]}"; do
    q=$(printf '%s' "${Q[$c]}" | median)
    s=$(printf '%s' "${S[$c]}" | median)
    printf '| `%s` | %.3f | %.3f | %.2f |\n' "$c" "$q" "$s" "$(echo "$q / $s" | bc -l)"
done
echo
echo "median of $ROUNDS interleaved rounds; $(nproc) CPUs; $(qemu-img --version | head -1)"
