#!/usr/bin/env bash
# Side-by-side benchmark: `qemu-img bench` and `sluice img bench` on the same
# images, in one run. Prints a Markdown table of throughput ratios
# (sluice / QEMU; above 1.0 means sluice is faster) for BENCHMARKS.md.
#
#   scripts/bench.sh            # all rows
#   ROWS=null scripts/bench.sh  # only the null-co rows
#   ROWS=file scripts/bench.sh  # only the raw-file rows
#   REPEAT=3                    # best of N runs per tool and row (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${BENCH_DIR:-/var/tmp/sluice-bench}
REPEAT=${REPEAT:-3}
ROWS=${ROWS:-all}
mkdir -p "$DIR"
cargo build --release --quiet --bin sluice
SLUICE=$PWD/target/release/sluice
IMG=$DIR/bench-1g.raw

if [ "$ROWS" != null ] && [ ! -s "$IMG" ]; then
  echo "creating $IMG (1 GiB of random data)" >&2
  head -c 1G /dev/urandom > "$IMG.tmp" && mv "$IMG.tmp" "$IMG"
fi

# best_time TOOL ARGS... : best "Run completed in X seconds" of $REPEAT runs.
# A run that fails is retried (up to 3 extra tries) and counted in
# $DIR/crashes; sluice failing is fatal, QEMU crashing is recorded (its
# `-i io_uring -d 1` overflows its stack now and then).
best_time() {
  local best="" t runs=0 tries=0
  while [ "$runs" -lt "$REPEAT" ]; do
    tries=$((tries + 1))
    t=$("$@" 2>&1 | sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p') || true
    if [ -z "$t" ]; then
      echo "run failed: $*" >&2
      echo "$*" >> "$DIR/crashes"
      [ "$1" = "$SLUICE" ] && exit 1
      [ "$tries" -gt $((REPEAT + 3)) ] && { echo "crash"; return; }
      continue
    fi
    runs=$((runs + 1))
    if [ -z "$best" ] || awk "BEGIN{exit !($t < $best)}"; then best=$t; fi
  done
  echo "$best"
}

# faster A_TIME A_NAME B_TIME B_NAME : prints "time name" of the faster one
faster() {
  if [ "$1" != crash ] && { [ "$3" = crash ] || awk "BEGIN{exit !($1 < $3)}"; }; then echo "$1 $2"; else echo "$3 $4"; fi
}

# row LABEL COUNT ARGS... : each tool at its best AIO mode (-i io_uring or
# -i threads, both measured), side by side
row() {
  local label=$1 count=$2; shift 2
  local q qm s sm
  read -r q qm < <(faster "$(best_time qemu-img bench -c "$count" -i io_uring "$@")" io_uring \
                          "$(best_time qemu-img bench -c "$count" -i threads "$@")" threads)
  read -r s sm < <(faster "$(best_time "$SLUICE" img bench -c "$count" -i io_uring "$@")" io_uring \
                          "$(best_time "$SLUICE" img bench -c "$count" -i threads "$@")" threads)
  printf '| %s | %s | %.0f (%s) | %.0f (%s) | **%.2f** |\n' "$label" "$count" \
    "$(awk "BEGIN{print $count/$q}")" "$qm" "$(awk "BEGIN{print $count/$s}")" "$sm" "$(awk "BEGIN{print $q/$s}")"
}

null_row() {
  local label=$1 count=$2; shift 2
  local q s
  q=$(best_time qemu-img bench -c "$count" "$@")
  s=$(best_time "$SLUICE" img bench -c "$count" "$@")
  printf '| %s | %s | %.0f | %.0f | **%.2f** |\n' "$label" "$count" \
    "$(awk "BEGIN{print $count/$q}")" "$(awk "BEGIN{print $count/$s}")" "$(awk "BEGIN{print $q/$s}")"
}

echo "qemu-img: $(qemu-img --version | head -1); machine: $(nproc) cores; best of $REPEAT runs"
echo
echo "| row | requests | QEMU ops/s | sluice ops/s | sluice/QEMU |"
echo "| --- | ---: | ---: | ---: | ---: |"
: > "$DIR/crashes"
if [ "$ROWS" != file ]; then
null_row "null-co read 4k d1" 2000000 -d 1 --image-opts driver=null-co
null_row "null-co read 4k d64" 2000000 -d 64 --image-opts driver=null-co
null_row "null-co write 4k d64" 2000000 -w -d 64 --image-opts driver=null-co
fi
[ "$ROWS" = null ] && exit 0

for cache in writeback none; do
  for rw in read write; do
    for bs in 4k 64k; do
      for depth in 1 64; do
        for spread in no yes; do
          w=(); [ "$rw" = write ] && w=(-w)
          # Spread requests 1 MiB + one request apart so the kernel cannot
          # merge them. For 64k requests the step stays 64k-aligned, or
          # both tools run a request past the end of the image.
          step=""; [ "$spread" = yes ] && { [ "$bs" = 4k ] && step=1052672 || step=1114112; }
          st=(); [ -n "$step" ] && st=(-S "$step")
          case "$cache/$bs/$depth" in
            writeback/4k/*) count=200000 ;;
            writeback/64k/*) count=50000 ;;
            none/4k/1) count=20000 ;;
            none/4k/64) count=100000 ;;
            none/64k/1) count=5000 ;;
            none/64k/64) count=20000 ;;
          esac
          label="raw $rw $bs d$depth -t $cache${step:+ -S $step}"
          row "$label" "$count" "${w[@]}" -d "$depth" -s "$bs" "${st[@]}" -t "$cache" -f raw "$IMG"
        done
      done
    done
  done
done

if [ -s "$DIR/crashes" ]; then
  echo
  echo "Failed runs (retried):"
  sort "$DIR/crashes" | uniq -c | sed 's/^/    /'
fi
