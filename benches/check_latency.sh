#!/usr/bin/env bash
# Health-check latency under load: how close do SQL checks come to `health.timeout`?
# Runs pgvane's SQL check query 20 times a second on one connection while pgbench loads the
# same PostgreSQL (select-only at 256 clients, then TPC-B-like at 64), and prints the
# latency distribution. This is the measurement behind keeping fixed rise/fall thresholds
# rather than an adaptive (phi-accrual) detector: a check slower than the timeout is what a
# false positive needs.
#
#   benches/check_latency.sh [seconds]
set -euo pipefail
. "$(dirname "$0")/../scripts/lib.sh"
DURATION=${1:-30}
ensure_postgres
ensure_packages pgbench:postgresql-client python3:python3
work_dir pgvane-checklat
cluster_start "$WORK" 0
P=${NODE_PORTS[0]}
pgbench -h 127.0.0.1 -p "$P" -U postgres -i -s 10 -q postgres > /dev/null 2>&1
echo "SELECT pg_is_in_recovery(), pg_current_wal_lsn();" > "$WORK/check.sql"
for load in "-S -c 256" "-c 64"; do
    # shellcheck disable=SC2086
    pgbench -h 127.0.0.1 -p "$P" -U postgres -M simple -j 2 -T $((DURATION + 5)) $load postgres > /dev/null 2>&1 &
    loader=$!
    sleep 2
    (cd "$WORK" && rm -f pgbench_log.* &&
        pgbench -h 127.0.0.1 -p "$P" -U postgres -n -c 1 -T "$DURATION" -R 20 -f check.sql -l postgres > /dev/null 2>&1)
    wait "$loader" || true
    python3 - "$load" "$WORK"/pgbench_log.* <<'PY'
import sys
load = sys.argv[1]
lat = sorted(int(line.split()[2]) / 1000.0 for f in sys.argv[2:] for line in open(f))
n = len(lat)
q = lambda x: lat[min(n - 1, int(x * n))]
print(f"pgbench {load}: {n} checks, median {q(0.5):.1f} ms, p99 {q(0.99):.1f} ms, "
      f"p99.9 {q(0.999):.1f} ms, max {lat[-1]:.1f} ms, slower than 1 s: {sum(l > 1000 for l in lat)}")
PY
done
