#!/usr/bin/env bash
# A binary upgrade with N idle pooled clients: pgvane (transaction pooling) holds them, a
# second pgvane with the same upgrade_socket takes over, and every client then queries
# again over the connection it has. Prints how long the old process took to hand over its
# sessions and exit, and how many clients failed (0 expected).
#
#   benches/upgrade.sh [N]        (default 2000)
set -euo pipefail
. "$(dirname "$0")/../scripts/lib.sh"
cd "$PGVANE_ROOT"
N=${1:-2000}

ensure_postgres
idle_clients_ready "$N"

work_dir pgvane-upgrade
cluster_start "$WORK" 0
RW_PORT=$(free_port); RO_PORT=$(free_port); TX_PORT=$(free_port)
pgvane_config "$WORK/pgvane.toml" 1s
sed -i "s|^max_client_conn = .*|&\nupgrade_socket = \"$WORK/upgrade.sock\"\nshutdown_timeout = \"600s\"|" "$WORK/pgvane.toml"
"$PWD/target/release/pgvane" --config "$WORK/pgvane.toml" > "$WORK/old.log" 2>&1 &
OLD_PID=$!
PIDS+=($OLD_PID)
wait_port "$TX_PORT"

HOLD=$((N / 200 + 20))
"$CLIENTS" "$TX_PORT" "$N" postgres "$PGPASSWORD" postgres "$HOLD" > "$WORK/clients.out" 2>&1 &
CLIENTS_PID=$!
for _ in $(seq 1 1200); do grep -q connected "$WORK/clients.out" 2>/dev/null && break; sleep 0.1; done
grep -q connected "$WORK/clients.out" || { echo "clients failed:"; cat "$WORK/clients.out"; exit 1; }

say "upgrading with $N idle clients"
START=$(date +%s.%N)
"$PWD/target/release/pgvane" --config "$WORK/pgvane.toml" > "$WORK/new.log" 2>&1 &
PIDS+=($!)
while kill -0 "$OLD_PID" 2>/dev/null; do sleep 0.05; done
END=$(date +%s.%N)
wait "$CLIENTS_PID" || true
grep -o 'sent=[0-9]* lost=[0-9]*' "$WORK/old.log" || true
cat "$WORK/clients.out"
awk -v a="$START" -v b="$END" \
    'BEGIN { printf "old process gone %.2f s after the new one started (shutdown_timeout 600 s)\n", b - a }'
grep -q "failed 0$" "$WORK/clients.out"
