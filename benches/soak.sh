#!/usr/bin/env bash
# Long soak of the pooled data path: the randomized oracle of tests/oracle.rs (clients
# sharing a small pool, random scripts with split writes, each answer compared with a
# direct connection) over many seeds. Prints how many operations ran through pgvane.
#
#   benches/soak.sh [seeds] [first seed]     (default: 200 seeds from 0)
set -euo pipefail
. "$(dirname "$0")/../scripts/lib.sh"
cd "$PGVANE_ROOT"
ensure_postgres
say "oracle soak: ${1:-200} seeds from ${2:-0}"
PGVANE_ORACLE_SEEDS=${1:-200} PGVANE_ORACLE_FIRST_SEED=${2:-0} \
    cargo test --locked --release --test oracle -- --nocapture 2>&1 | grep -E '^oracle:|test result|panicked|assertion|^  (left|right)'
