#!/usr/bin/env bash
# Instructions per transaction in pgvane (transaction pooling, one thread) under callgrind:
# a count that a busy machine does not move, for an A/B of a small data-path change that
# CPU time on this shared machine would hide in its noise.
#
#   benches/instructions.sh [-c clients] [-w "pgbench flags"] [-b]     (default -c 32 -w -S)
#
# pgbench runs twice through the same pgvane, A and then B transactions per client, each
# run between a zeroing and a dump of callgrind's counters: (Ir(B) - Ir(A)) / ((B - A) *
# clients) leaves out what both runs share (logins, the first connections). Everything
# the process runs counts (tokio, libc, the allocator), the kernel does not. A pool of 20:
# from about 40 clients most transactions wait for a server connection. BASELINE=BINARY
# measures another build the same way, -b PgBouncer (transaction pooling, same pool);
# PROFILE=DIR keeps the dumps for callgrind_annotate.
set -euo pipefail
. "$(dirname "$0")/../scripts/lib.sh"
cd "$PGVANE_ROOT"

CLIENTS=32 FLAGS=-S BOUNCER=""
while getopts "c:w:b" o; do
    case $o in
        c) CLIENTS=$OPTARG ;; w) FLAGS=$OPTARG ;; b) BOUNCER=1 ;; *) exit 2 ;;
    esac
done
# Transactions per client in the two runs: about 3,000 and 13,000 in all at 32 clients.
A=$(( (3200 + CLIENTS - 1) / CLIENTS )) B=$(( (12800 + CLIENTS - 1) / CLIENTS ))
B=$((B > A + 20 ? B : A + 20))

ensure_postgres
ensure_packages pgbench:postgresql-client python3:python3 valgrind:valgrind
[ -n "$BOUNCER" ] && ensure_packages pgbouncer:pgbouncer
cargo build --release --locked --quiet
nofile_max

work_dir pgvane-instructions
cluster_start "$WORK" 0
pgbench -h 127.0.0.1 -p "${NODE_PORTS[0]}" -U postgres -i -s 10 -q postgres > /dev/null 2>&1

# count NAME BINARY: prints the instructions per transaction of BINARY ("pgbouncer": of
# PgBouncer, as pgbouncer_start configures it).
count() {
    local name=$1 binary=$2 port pid ir=() ctl=(callgrind_control)
    local wrap=(valgrind --tool=callgrind "--callgrind-out-file=$WORK/$name.cg.%p")
    if [ "$binary" = pgbouncer ]; then
        # Again in the foreground (callgrind loses sight of a daemon's fork), as the user
        # it runs as; callgrind_control finds a process by the USER it was started with.
        pgbouncer_start "$WORK" 20000
        kill "$(cat "$WORK/pgbouncer.pid")"
        for _ in $(seq 1 100); do [ -e "$WORK/pgbouncer.pid" ] || break; sleep 0.1; done
        local user=${PG_USER:-$USER}
        [ "$(id -u)" -eq 0 ] && ctl=(runuser -u "$user" -- callgrind_control)
        (USER=$user as_pg_exec "${wrap[@]}" pgbouncer "$WORK/pgbouncer.ini" > /dev/null 2>&1) &
        pid=$! port=$BOUNCER_PORT
    else
        WRAP="${wrap[*]}" pgvane_start "$name" "$binary" 1
        pid=$STARTED_PID port=$TXN_PORT
    fi
    for _ in $(seq 1 1200); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    # The pool's connections opened, every code path taken once.
    pgbench -h 127.0.0.1 -p "$port" -U postgres $FLAGS -c "$CLIENTS" -j 2 -t 5 postgres > /dev/null 2>&1
    for t in "$A" "$B"; do
        "${ctl[@]}" -z "$pid" > /dev/null 2>&1
        pgbench -h 127.0.0.1 -p "$port" -U postgres $FLAGS -c "$CLIENTS" -j 2 -t "$t" postgres \
            > "$WORK/$name.pgbench" 2>&1 || { cat "$WORK/$name.pgbench"; exit 1; }
        "${ctl[@]}" -d "$pid" > /dev/null 2>&1
        # callgrind numbers its dumps 1, 2, ...
        local dump="$WORK/$name.cg.$pid.$(( ${#ir[@]} + 1 ))"
        for _ in $(seq 1 600); do [ -s "$dump" ] && break; sleep 0.1; done
        ir+=("$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")")
        [ -n "${PROFILE:-}" ] && mkdir -p "$PROFILE" && cp "$dump" "$PROFILE/$name.$t.callgrind"
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true
    python3 -c "print('$name: %d instructions per transaction' % round(($((ir[1])) - $((ir[0]))) / (($B - $A) * $CLIENTS)))"
}

say "pgbench $FLAGS, $CLIENTS clients, pool of 20: $A then $B transactions per client"
count pgvane "$PWD/target/release/pgvane"
[ -n "${BASELINE:-}" ] && count baseline "$BASELINE"
[ -n "$BOUNCER" ] && count pgbouncer pgbouncer
exit 0
