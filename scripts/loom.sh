#!/usr/bin/env bash
# Model-checks the drain / in-flight primitive (crates/core/src/drain/gate.rs)
# with loom. Only the gate module is compiled under --cfg loom (see
# crates/core/tests/loom_gate.rs); a separate target dir keeps the loom build
# from invalidating the normal one.
#
# Environment: LOOM_MAX_PREEMPTIONS (default 3, set in the test), LOOM_LOG,
# LOOM_LOCATION, LOOM_CHECKPOINT_FILE as documented by loom. Extra arguments
# are passed to the test binary (e.g. a test name filter).
set -euo pipefail

cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/loom}"
export RUSTFLAGS="${RUSTFLAGS:-} --cfg loom"

exec cargo test -p sluice-core --test loom_gate --release -- "$@"
