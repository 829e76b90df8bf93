#!/usr/bin/env bash
# End-to-end load benchmark: pgbench against PostgreSQL directly, through pgvane
# (passthrough, and transaction pooling with the default threads and with
# worker_threads = 1), through HAProxy (tcp) and through PgBouncer (transaction pooling,
# same pool size), all Debian packages, in the same run, on one local primary + replica.
# SCRAM-SHA-256 on every hop; PgBouncer's auth_file holds the SCRAM verifier from
# pg_authid, so neither pooler runs PBKDF2 per client.
# Reports the median tps of each target as a ratio to the direct connection, and the CPU
# time (user + system) each proxy process spent per transaction. The machine is shared
# and noisy: only ratios from one run mean anything, and CPU per transaction varies far
# less between runs than tps does.
#
#   benches/load.sh [-T seconds] [-r repetitions] [-s scale] [-w "0 1"] [-t "direct pgvane-txn"] [-l] [-e]
#
# -w picks workloads by number (0-6, in the order below), -t targets by name. -b BINARY
# adds a target "baseline-txn-1t": another pgvane build (say, the last release) with
# worker_threads = 1, for an A/B of CPU per transaction within one run. -l adds
# "pgvane-txn-1t-limits": the same on one thread with every [limits] key set but never hit.
# -e adds "pgvane-txn-1t-tls" and "pgbouncer-tls": the same with TLS toward the clients
# (client_tls_sslmode = require, one ECDSA P-256 certificate for both; pgbench connects
# with sslmode=require), so that TLS's cost and handshakes per second (-C) compare.
#
# Workloads (simple protocol unless said): -S (select-only) at 32 and 256 clients,
# TPC-B-like at 32 clients, connection churn (-C -S, a new connection per transaction) at
# 16 clients, -S with named prepared statements (-M prepared) at 32 clients, which a
# transaction pooler must carry across server connections (PgBouncer 1.18 cannot: "failed"),
# TPC-B-like at 256 clients, and -S -M prepared at 256 clients.
set -euo pipefail
. "$(dirname "$0")/../scripts/lib.sh"
cd "$PGVANE_ROOT"

DURATION=10 REPS=3 SCALE=10 ONLY_W="" ONLY_T="" BASELINE="" LIMITS="" TLS=""
while getopts "T:r:s:w:t:b:le" o; do
    case $o in
        T) DURATION=$OPTARG ;; r) REPS=$OPTARG ;; s) SCALE=$OPTARG ;;
        w) ONLY_W=$OPTARG ;; t) ONLY_T=$OPTARG ;; b) BASELINE=$OPTARG ;; l) LIMITS=1 ;;
        e) TLS=1 ;;
        *) exit 2 ;;
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

bench_targets_start
LIMITS_TARGET=()
if [ -n "$LIMITS" ]; then
    # Every limit on, set far above what the workloads reach: the cost of checking them.
    EXTRA='
[limits]
allow = ["127.0.0.0/8"]
deny = ["10.255.255.0/24"]
ip_connection_rate = "1000000/s"
ip_max_connections = 1000000
ip_auth_failures = 1000000
user_connection_rate = "1000000/s"
max_user_client_connections = 1000000
max_db_client_connections = 1000000
user_transaction_rate = "100000000/s"
user_transaction_burst = 100000000' pgvane_start limits "$PGVANE" 1
    LIMITS_TARGET=("pgvane-txn-1t-limits:$TXN_PORT:$STARTED_PID")
    wait_port "$TXN_PORT"
fi
BASE_TARGET=()
if [ -n "$BASELINE" ]; then
    pgvane_start baseline "$BASELINE" 1
    BASE_TARGET=("baseline-txn-1t:$TXN_PORT:$STARTED_PID")
    wait_port "$TXN_PORT"
fi
TLS_TARGETS=()
if [ -n "$TLS" ]; then
    mkdir -p "$WORK/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
        -subj /CN=localhost -keyout "$WORK/tls/server.key" -out "$WORK/tls/server.crt" 2>/dev/null
    chmod 644 "$WORK/tls/server.key"
    EXTRA="
[tls]
client_tls_sslmode = \"require\"
client_tls_cert_file = \"$WORK/tls/server.crt\"
client_tls_key_file = \"$WORK/tls/server.key\"" pgvane_start tls "$PGVANE" 1
    TLS_TARGETS=("pgvane-txn-1t-tls:$TXN_PORT:$STARTED_PID:require")
    wait_port "$TXN_PORT"
    PLAIN_BOUNCER_PORT=$BOUNCER_PORT
    pgbouncer_start "$WORK/tls" 20000 "client_tls_sslmode = require
client_tls_key_file = $WORK/tls/server.key
client_tls_cert_file = $WORK/tls/server.crt"
    TLS_TARGETS+=("pgbouncer-tls:$BOUNCER_PORT:$(cat "$WORK/tls/pgbouncer.pid"):require")
    BOUNCER_PORT=$PLAIN_BOUNCER_PORT
fi

pgbench -h 127.0.0.1 -p "$DIRECT" -U postgres -i -s "$SCALE" -q postgres > /dev/null 2>&1

# name:port:pid of the process whose CPU time is measured (none for direct).
TARGETS=("direct:$DIRECT:" "pgvane-pass:$PASS:$PGVANE_PID" "haproxy:$HAPROXY_PORT:$HAPROXY_PID"
         "pgvane-txn:$TXN:$PGVANE_PID" "pgvane-txn-1t:$TXN1:$PGVANE1_PID"
         "pgbouncer-txn:$BOUNCER_PORT:$BOUNCER_PID" "${BASE_TARGET[@]}" "${LIMITS_TARGET[@]}"
         "${TLS_TARGETS[@]}")
# Prepared runs use a pgbench thread per client: pgbench prepares synchronously (PQprepare),
# blocking its thread while that client waits for a server connection, so with fewer threads
# than clients a transaction pooler's pool can be held by clients of the blocked thread.
WORKLOADS=("-M simple -S -c 32 -j 2" "-M simple -S -c 256 -j 2" "-M simple -c 32 -j 2"
           "-M simple -C -S -c 16 -j 2" "-M prepared -S -c 32 -j 32" "-M simple -c 256 -j 2"
           "-M prepared -S -c 256 -j 256")
NAMES=("-S, 32 clients" "-S, 256 clients" "TPC-B-like, 32 clients" "-C -S (new connection per txn), 16 clients"
       "-S -M prepared, 32 clients" "TPC-B-like, 256 clients" "-S -M prepared, 256 clients")

# utime + stime of a process, in clock ticks; 0 without a pid.
cpu_ticks() { if [ -n "$1" ]; then awk '{print $14 + $15}' "/proc/$1/stat"; else echo 0; fi; }

RESULTS="$WORK/results"
: > "$RESULTS"
for w in "${!WORKLOADS[@]}"; do
    [ -n "$ONLY_W" ] && [[ " $ONLY_W " != *" $w "* ]] && continue
    for rep in $(seq 1 "$REPS"); do
        # Interleave targets within a repetition so drift hits all of them alike.
        for t in "${TARGETS[@]}"; do
            IFS=: read -r name port pid sslmode <<< "$t"
            [ -n "$ONLY_T" ] && [ "$name" != direct ] && [[ " $ONLY_T " != *" $name "* ]] && continue
            cpu0=$(cpu_ticks "$pid")
            # A run with errors (pgbench exits non-zero, clients aborted) counts as failed.
            # TLS targets: sslmode=require; the others as libpq's default (prefer) has it.
            out=$(PGSSLMODE=${sslmode:-prefer} pgbench -h 127.0.0.1 -p "$port" -U postgres -T "$DURATION" \
                  ${WORKLOADS[$w]} postgres 2>/dev/null) || out=""
            cpu1=$(cpu_ticks "$pid")
            tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<< "$out")
            txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<< "$out")
            # CPU microseconds per transaction, to a tenth (clock ticks are 10 ms; a run has
            # hundreds of thousands of transactions).
            us=$([ -n "$pid" ] && [ -n "$txns" ] && [ "$txns" -gt 0 ] && python3 -c "print(f'{($cpu1 - $cpu0) * 10000 / $txns:.1f}')" || echo -)
            echo "$w $name ${tps:-0} $us" >> "$RESULTS"
            printf '  %-45s %-14s rep %s: %s tps, %s us CPU/txn\n' "${NAMES[$w]}" "$name" "$rep" "${tps:-failed}" "$us"
        done
    done
done

say "median over $REPS runs of ${DURATION}s: tps as a ratio to direct, then the proxy's CPU per transaction"
echo "measured $(date -u +%F) at commit $(git -C "$PGVANE_ROOT" rev-parse --short HEAD)$(git -C "$PGVANE_ROOT" diff --quiet || echo ' (with uncommitted changes)'): benches/load.sh -T $DURATION -r $REPS"
python3 - "$RESULTS" "${NAMES[@]}" <<'PY'
import sys, statistics, collections
rows = [l.split() for l in open(sys.argv[1])]
names = sys.argv[2:]
tps, cpu = collections.defaultdict(list), collections.defaultdict(list)
order = []
for w, t, v, us in rows:
    tps[(int(w), t)].append(float(v))
    if us != "-":
        cpu[(int(w), t)].append(float(us))
    if t not in order: order.append(t)

def table(title, cell, targets):
    print(f"\n{title}\n")
    print("| workload | " + " | ".join(targets) + " |")
    print("|---|" + "---:|" * len(targets))
    for w, n in enumerate(names):
        if (w, "direct") in tps:
            print(f"| {n} | " + " | ".join(cell(w, t) for t in targets) + " |")

def ratio(w, t):
    if (w, t) not in tps:
        return ""
    direct, m = statistics.median(tps[(w, "direct")]), statistics.median(tps[(w, t)])
    if m == 0:
        return "failed"
    return f"{m:.0f}" if t == "direct" else f"{m/direct:.2f}x" if direct else "n/a"

def micros(w, t):
    return f"{statistics.median(cpu[(w, t)]):.1f}" if cpu[(w, t)] else ""

table("tps (direct) and ratio to direct", ratio, order)
table("proxy CPU per transaction, microseconds (user + system)", micros,
      [t for t in order if t != "direct"])
PY
