#!/usr/bin/env bash
# End-to-end load benchmark: pgbench against PostgreSQL directly, through pgvane
# (passthrough and transaction pooling), through HAProxy (tcp) and through PgBouncer
# (transaction pooling, same pool size), all Debian packages, in the same run, on one local
# primary + replica. SCRAM-SHA-256 on every hop; PgBouncer's auth_file holds the SCRAM
# verifier from pg_authid, so neither pooler runs PBKDF2 per client.
# Reports the median tps of each target and its ratio to the direct connection; the
# machine is shared and noisy, so only ratios from one run mean anything.
#
#   benches/load.sh [-T seconds] [-r repetitions] [-s scale] [-w "0 1"] [-t "direct pgvane-txn"]
#
# -w picks workloads by number (0-4, in the order below), -t targets by name.
#
# Workloads (simple protocol unless said): -S (select-only) at 32 and 256 clients,
# TPC-B-like at 32 clients, connection churn (-C -S, a new connection per transaction) at
# 16 clients, and -S with named prepared statements (-M prepared) at 32 clients, which a
# transaction pooler must carry across server connections (PgBouncer 1.18 cannot: "failed").
set -euo pipefail
. "$(dirname "$0")/../scripts/lib.sh"
cd "$PGVANE_ROOT"

DURATION=10 REPS=3 SCALE=10 ONLY_W="" ONLY_T=""
while getopts "T:r:s:w:t:" o; do
    case $o in
        T) DURATION=$OPTARG ;; r) REPS=$OPTARG ;; s) SCALE=$OPTARG ;;
        w) ONLY_W=$OPTARG ;; t) ONLY_T=$OPTARG ;; *) exit 2 ;;
    esac
done

ensure_postgres
ensure_packages pgbench:postgresql-client python3:python3 haproxy:haproxy pgbouncer:pgbouncer
cargo build --release --locked --quiet
PGVANE="$PGVANE_ROOT/target/release/pgvane"

work_dir pgvane-bench

say "cluster: primary + replica, scale $SCALE"
cluster_start "$WORK" 1
DIRECT=${NODE_PORTS[0]}

RW_PORT=$(free_port); RO_PORT=$(free_port); TX_PORT=$(free_port)
pgvane_config "$WORK/pgvane.toml" 1s
"$PGVANE" --config "$WORK/pgvane.toml" > "$WORK/pgvane.log" 2>&1 &
PIDS+=($!)

HAPROXY_PORT=$(free_port)
cat > "$WORK/haproxy.cfg" <<CFG
global
    maxconn 4096
defaults
    mode tcp
    timeout client 30m
    timeout server 30m
    timeout connect 4s
listen pg
    bind 127.0.0.1:$HAPROXY_PORT
    server pg0 127.0.0.1:$DIRECT maxconn 1000
CFG
haproxy -f "$WORK/haproxy.cfg" -db > "$WORK/haproxy.log" 2>&1 &
PIDS+=($!)

pgbouncer_start "$WORK" 20000
wait_port "$RW_PORT"; wait_port "$TX_PORT"; wait_port "$HAPROXY_PORT"; wait_port "$BOUNCER_PORT"

pgbench -h 127.0.0.1 -p "$DIRECT" -U postgres -i -s "$SCALE" -q postgres > /dev/null 2>&1

TARGETS=("direct:$DIRECT" "pgvane-pass:$RW_PORT" "haproxy:$HAPROXY_PORT" "pgvane-txn:$TX_PORT" "pgbouncer-txn:$BOUNCER_PORT")
WORKLOADS=("-M simple -S -c 32" "-M simple -S -c 256" "-M simple -c 32" "-M simple -C -S -c 16"
           "-M prepared -S -c 32")
NAMES=("-S, 32 clients" "-S, 256 clients" "TPC-B-like, 32 clients" "-C -S (new connection per txn), 16 clients"
       "-S -M prepared, 32 clients")

RESULTS="$WORK/results"
: > "$RESULTS"
for w in "${!WORKLOADS[@]}"; do
    [ -n "$ONLY_W" ] && [[ " $ONLY_W " != *" $w "* ]] && continue
    for rep in $(seq 1 "$REPS"); do
        # Interleave targets within a repetition so drift hits all of them alike.
        for t in "${TARGETS[@]}"; do
            name=${t%%:*} port=${t#*:}
            [ -n "$ONLY_T" ] && [ "$name" != direct ] && [[ " $ONLY_T " != *" $name "* ]] && continue
            # A run with errors (pgbench exits non-zero, clients aborted) counts as failed.
            tps=$(pgbench -h 127.0.0.1 -p "$port" -U postgres -j 2 -T "$DURATION" \
                  ${WORKLOADS[$w]} postgres 2>/dev/null) && tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<< "$tps") || tps=""
            echo "$w $name ${tps:-0}" >> "$RESULTS"
            printf '  %-45s %-14s rep %s: %s tps\n' "${NAMES[$w]}" "$name" "$rep" "${tps:-failed}"
        done
    done
done

say "median tps over $REPS runs of ${DURATION}s; ratio to direct"
python3 - "$RESULTS" "${NAMES[@]}" <<'PY'
import sys, statistics, collections
rows = [l.split() for l in open(sys.argv[1])]
names = sys.argv[2:]
tps = collections.defaultdict(list)
order = []
for w, t, v in rows:
    tps[(int(w), t)].append(float(v))
    if t not in order: order.append(t)
print("| workload | " + " | ".join(order) + " |")
print("|---|" + "---:|" * len(order))
for w, n in enumerate(names):
    if (w, "direct") not in tps:
        continue
    direct = statistics.median(tps[(w, "direct")])
    cells = []
    for t in order:
        if (w, t) not in tps:
            cells.append("")
            continue
        m = statistics.median(tps[(w, t)])
        if m == 0:
            cells.append("failed")
            continue
        cells.append(f"{m:.0f}" if t == "direct" else f"{m/direct:.2f}x" if direct else "n/a")
    print(f"| {n} | " + " | ".join(cells) + " |")
PY
