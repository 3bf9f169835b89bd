#!/usr/bin/env bash
# Runs every check and test sluice has: formatting, lints, the test suite
# (unit, integration, interop with QEMU's tools, stress) and the loom model
# of the drain primitive. This is the command CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

echo "== cargo test"
cargo test --workspace

if [ -x scripts/loom.sh ]; then
  echo "== loom model check of the drain primitive"
  scripts/loom.sh
fi
