#!/usr/bin/env bash
# Side-by-side benchmark: `qemu-img bench` and `sluice img bench` on the same
# images, in one run. Prints a Markdown table of throughput ratios
# (sluice / QEMU; above 1.0 means sluice is faster) for BENCHMARKS.md.
#
#   scripts/bench.sh            # all rows
#   ROWS=null scripts/bench.sh  # only the null-co rows
#   ROWS=file scripts/bench.sh  # only the raw-file rows
#   ROWS=qcow2 scripts/bench.sh # null-co and qcow2 rows
#   CACHES=none ROWS=file scripts/bench.sh  # only the -t none file rows
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

# one_time TOOL ARGS... : seconds of one run, retried up to 3 times when it
# fails (QEMU's `-i io_uring -d 1` overflows its stack now and then; failures
# are listed at the end); "crash" if every try failed. sluice failing is fatal.
one_time() {
  local t tries
  for tries in 1 2 3 4; do
    t=$("$@" 2>&1 | sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p') || true
    if [ -n "$t" ]; then echo "$t"; return; fi
    echo "run failed: $*" >&2
    echo "$*" >> "$DIR/crashes"
    [ "$1" = "$SLUICE" ] && exit 1
  done
  echo crash
}

# row LABEL COUNT ARGS... : each tool at its best AIO mode (-i io_uring and
# -i threads both measured). The four configurations take turns, REPEAT
# rounds, so that both tools see the same state of the disk and page cache;
# each keeps its best run.
row() {
  local label=$1 count=$2; shift 2
  local cfg=("qemu-img bench -i io_uring" "qemu-img bench -i threads" "$SLUICE img bench -i io_uring" "$SLUICE img bench -i threads")
  local best=(crash crash crash crash) i t
  for _ in $(seq "$REPEAT"); do
    for i in 0 1 2 3; do
      # shellcheck disable=SC2086
      t=$(one_time ${cfg[$i]} -c "$count" "$@")
      if [ "$t" != crash ] && { [ "${best[$i]}" = crash ] || awk "BEGIN{exit !($t < ${best[$i]})}"; }; then best[$i]=$t; fi
    done
  done
  local q qm s sm
  read -r q qm < <(faster "${best[0]}" io_uring "${best[1]}" threads)
  read -r s sm < <(faster "${best[2]}" io_uring "${best[3]}" threads)
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

if [ "$ROWS" != file ]; then
# qcow2: allocating writes into a fresh image each run, then reads and
# rewrites of the allocated image. fresh IMG TOOL ARGS... recreates IMG first.
fresh() {
  local img=$1; shift
  qemu-img create -q -f qcow2 "$img" 1G
  "$@"
}
Q2=$DIR/bench.qcow2
for pair in "alloc-write|-w -c 8192 -s 64k -d 64" "alloc-write|-w -c 32768 -s 4k -d 64"; do
  label=${pair%%|*}; args=${pair#*|}
  # shellcheck disable=SC2086
  q=$(best_time fresh "$Q2" qemu-img bench $args -t writeback -f qcow2 "$Q2")
  # shellcheck disable=SC2086
  s=$(best_time fresh "$Q2" "$SLUICE" img bench $args -t writeback -f qcow2 "$Q2")
  count=$(echo "$args" | sed -n 's/.*-c \([0-9]*\).*/\1/p')
  printf '| qcow2 %s %s d64 -t writeback (fresh image) | %s | %.0f | %.0f | **%.2f** |\n' "$label" "$(echo "$args" | sed -n 's/.*-s \([0-9a-z]*\).*/\1/p')" "$count" \
    "$(awk "BEGIN{print $count/$q}")" "$(awk "BEGIN{print $count/$s}")" "$(awk "BEGIN{print $q/$s}")"
done
qemu-img create -q -f qcow2 "$Q2" 1G
qemu-io -f qcow2 -c 'write -P 0x5a 0 512M' "$Q2" >/dev/null
null_row "qcow2 read 64k d64 (allocated)" 8192 -d 64 -s 64k -t writeback -f qcow2 "$Q2"
null_row "qcow2 rewrite 4k d64 (allocated)" 100000 -w -d 64 -s 4k -t writeback -f qcow2 "$Q2"
fi
[ "$ROWS" = qcow2 ] && exit 0

for cache in ${CACHES:-writeback none}; do
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
