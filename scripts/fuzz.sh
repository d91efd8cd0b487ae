#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, cargo-fuzz with libFuzzer) for N seconds each, one after the
# other: `scripts/fuzz.sh [seconds-per-target] [target...]` (default 20 s, every target).
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
#
# libFuzzer starts from the committed seeds (fuzz/corpus/<target>/, read only) and keeps what it
# finds under target/fuzz-corpus/<target>/, so the committed corpus stays small. A failing input
# is written to fuzz/artifacts/<target>/; fix the gateway, then commit the input under
# fuzz/regressions/<target>/ (the stable unit tests replay it).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"
shift || true
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cd fuzz && cargo +nightly fuzz list)
fi
# One fuzzing process per target (cargo-fuzz's default of one job). `--sanitizer none
# --debug-assertions`: the gateway is safe Rust, so AddressSanitizer finds little and costs
# several times the executions, while debug assertions turn every integer overflow into a
# finding. -rss_limit_mb bounds a runaway input; nice lets other builds keep the CPU.
for target in "${targets[@]}"; do
  work="target/fuzz-corpus/$target"
  mkdir -p "$work"
  echo "== fuzz $target for ${seconds}s"
  seeds=()
  for dir in "corpus/$target" "regressions/$target"; do
    if [ -d "fuzz/$dir" ]; then seeds+=("$dir"); fi
  done
  (cd fuzz && nice -n 19 cargo +nightly fuzz run --sanitizer none --debug-assertions "$target" "../$work" "${seeds[@]}" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1)
done
