#!/usr/bin/env bash
# Memory per idle client: pgvane (transaction pooling) against PgBouncer (Debian package,
# transaction pooling), each holding N logged-in idle clients, in the same run.
#
#   benches/idle_rss.sh [N]        (default 10000)
#
# BASELINE=BINARY adds another pgvane build, measured the same way in the same run, for an
# A/B of a change.
set -euo pipefail
. "$(dirname "$0")/../scripts/lib.sh"
cd "$PGVANE_ROOT"
N=${1:-10000}

ensure_postgres
ensure_packages python3:python3 psql:postgresql-client pgbouncer:pgbouncer
idle_clients_ready "$N"

work_dir pgvane-rss

cluster_start "$WORK" 0
pgvane_start pgvane "$PWD/target/release/pgvane"
PGVANE_PID=$STARTED_PID PGVANE_TX_PORT=$TXN_PORT
if [ -n "${BASELINE:-}" ]; then
    pgvane_start baseline "$BASELINE"
    BASE_PID=$STARTED_PID BASE_TX_PORT=$TXN_PORT
    wait_port "$BASE_TX_PORT"
fi

pgbouncer_start "$WORK" $((N + 100))
wait_port "$PGVANE_TX_PORT"
BOUNCER_PID=$(cat "$WORK/pgbouncer.pid")

measure() {
    local name=$1 pid=$2 port=$3 before after
    before=$(rss "$pid")
    "$CLIENTS" "$port" "$N" postgres "$PGPASSWORD" postgres 600 > "$WORK/clients.out" 2>&1 &
    local cpid=$!
    for _ in $(seq 1 1200); do grep -q connected "$WORK/clients.out" 2>/dev/null && break; sleep 0.1; done
    grep -q connected "$WORK/clients.out" || { echo "clients failed:"; cat "$WORK/clients.out"; exit 1; }
    sleep 1
    after=$(rss "$pid")
    kill "$cpid"; wait "$cpid" 2>/dev/null || true
    echo "$name $before $after"
}

say "$N idle clients each"
{
    measure pgvane "$PGVANE_PID" "$PGVANE_TX_PORT"
    sleep 2
    if [ -n "${BASELINE:-}" ]; then
        measure baseline "$BASE_PID" "$BASE_TX_PORT"
        sleep 2
    fi
    measure pgbouncer "$BOUNCER_PID" "$BOUNCER_PORT"
} | tee "$WORK/rss"
python3 - "$WORK/rss" "$N" <<'PY'
import sys
n = int(sys.argv[2])
rows = {l.split()[0]: (int(l.split()[1]), int(l.split()[2])) for l in open(sys.argv[1])}
per = {k: (a - b) * 1024 / n for k, (b, a) in rows.items()}
print("| proxy | RSS before (KiB) | RSS with %d idle clients (KiB) | per client (bytes) |" % n)
print("|---|---:|---:|---:|")
for k, (b, a) in rows.items():
    print(f"| {k} | {b} | {a} | {per[k]:.0f} |")
print(f"pgvane / pgbouncer per idle client: {per['pgvane'] / per['pgbouncer']:.2f}x")
PY
