# Shared shell helpers for scripts/test, scripts/demo and benches/*.sh. Source, don't run.
# shellcheck shell=bash

PGVANE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# PostgreSQL server binaries: installed from Debian packages when missing (as root), or the
# exact command to run is printed.
ensure_postgres() {
    if pg_bindir >/dev/null 2>&1; then return 0; fi
    local pkgs="postgresql postgresql-contrib"
    if [ "$(id -u)" -eq 0 ]; then
        say "installing PostgreSQL server from Debian packages ($pkgs)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq $pkgs >/dev/null
        pg_bindir >/dev/null || { echo "PostgreSQL still not found after install" >&2; exit 1; }
    else
        echo "PostgreSQL server programs (initdb, pg_ctl) are missing. Install them with:" >&2
        echo "    sudo apt-get install -y $pkgs" >&2
        exit 1
    fi
}

# Prints the directory holding initdb/pg_ctl (newest version first).
pg_bindir() {
    local d
    if [ -n "${PGVANE_PG_BINDIR:-}" ] && [ -x "$PGVANE_PG_BINDIR/initdb" ]; then echo "$PGVANE_PG_BINDIR"; return; fi
    d=$(pg_config --bindir 2>/dev/null || true)
    if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return; fi
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return; fi
    return 1
}

# Extra packages some scripts want, as COMMAND:PACKAGE (or FILE:PACKAGE); pgbench's client
# ships with postgresql-client.
ensure_packages() {
    local missing=()
    for spec in "$@"; do
        local bin=${spec%%:*} pkg=${spec#*:}
        command -v "$bin" >/dev/null 2>&1 || [ -e "$bin" ] || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -eq 0 ]; then
        say "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "missing: ${missing[*]}; install with: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
}

# The drivers of the driver matrix (tests/drivers.rs), from their registries, under
# target/drivers: psycopg 3 and asyncpg in a venv, node-postgres with npm, and Debian's
# pgjdbc. Reinstalled only when missing.
ensure_drivers() {
    local dir="$PGVANE_ROOT/target/drivers"
    mkdir -p "$dir"
    if ! "$dir/venv/bin/python" -c 'import psycopg, asyncpg' 2>/dev/null; then
        say "installing psycopg and asyncpg (PyPI) into $dir/venv"
        python3 -m venv "$dir/venv"
        "$dir/venv/bin/pip" install -q "psycopg[binary]" asyncpg
    fi
    if [ ! -d "$dir/node/node_modules/pg" ]; then
        say "installing node-postgres (npm) into $dir/node"
        mkdir -p "$dir/node"
        (cd "$dir/node" && npm install --silent --no-audit --no-fund pg >/dev/null)
    fi
    ensure_packages /usr/share/java/postgresql.jar:libpostgresql-jdbc-java
}

# work_dir PREFIX: a temp dir in WORK, removed on exit together with everything started
# for it: the processes in PIDS, a PgBouncer of pgbouncer_start, the cluster.
work_dir() {
    WORK=$(mktemp -d "/tmp/$1.XXXXXX")
    PIDS=()
    trap work_cleanup EXIT
}

work_cleanup() {
    # Best effort: a node that was killed, say, makes pg_ctl stop fail; carry on regardless.
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -f "$WORK/pgbouncer.pid" ] && kill "$(cat "$WORK/pgbouncer.pid")" 2>/dev/null
    wait 2>/dev/null || true
    cluster_stop
    rm -rf "$WORK"
}

# A free loopback port from the kernel.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Runs a PostgreSQL program as an unprivileged user when we are root (PostgreSQL refuses root).
PG_USER=postgres
pg_run() {
    local bin
    bin="$(pg_bindir)/$1"; shift
    if [ "$(id -u)" -eq 0 ]; then
        id "$PG_USER" >/dev/null 2>&1 || PG_USER=nobody
        runuser -u "$PG_USER" -- env PGPASSWORD="$PGPASSWORD" "$bin" "$@"
    else
        "$bin" "$@"
    fi
}

# cluster_start DIR NREPLICAS: a primary and streaming replicas on free ports under DIR.
# Sets NODE_PORTS (primary first) and NODE_DIRS.
export PGPASSWORD=pgvane-demo
cluster_start() {
    local dir=$1 replicas=$2 port
    NODE_PORTS=(); NODE_DIRS=()
    mkdir -p "$dir"
    if [ "$(id -u)" -eq 0 ]; then id "$PG_USER" >/dev/null 2>&1 || PG_USER=nobody; chown "$PG_USER" "$dir"; fi
    printf '%s' "$PGPASSWORD" > "$dir/pwfile"; [ "$(id -u)" -eq 0 ] && chown "$PG_USER" "$dir/pwfile"
    pg_run initdb -D "$dir/pg0" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
        --pwfile="$dir/pwfile" --no-sync -E UTF8 --locale=C >/dev/null
    port=$(free_port)
    cat >> "$dir/pg0/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
max_connections = 400
shared_buffers = 128MB
synchronous_commit = off
wal_level = replica
max_wal_senders = 10
wal_keep_size = 512MB
hot_standby = on
cluster_name = 'pg0'
CONF
    pg_run pg_ctl -D "$dir/pg0" -l "$dir/pg0.log" -w start >/dev/null
    NODE_PORTS+=("$port"); NODE_DIRS+=("$dir/pg0")
    for i in $(seq 1 "$replicas"); do
        port=$(free_port)
        pg_run pg_basebackup -h 127.0.0.1 -p "${NODE_PORTS[0]}" -U postgres -D "$dir/pg$i" \
            -R -X stream -c fast --no-sync
        printf "port = %s\ncluster_name = 'pg%s'\n" "$port" "$i" >> "$dir/pg$i/postgresql.conf"
        pg_run pg_ctl -D "$dir/pg$i" -l "$dir/pg$i.log" -w start >/dev/null
        NODE_PORTS+=("$port"); NODE_DIRS+=("$dir/pg$i")
    done
}

# Runs a program as the unprivileged user when we are root, in place (exec: the caller's $!
# is the program), without the demo's libpq variables (Patroni's pg_basebackup must use
# its own pgpass file).
as_pg_exec() {
    local prog=$1; shift
    if [ "$(id -u)" -eq 0 ]; then
        id "$PG_USER" >/dev/null 2>&1 || PG_USER=nobody
        exec setpriv --reuid="$PG_USER" --regid="$(id -g "$PG_USER")" --init-groups \
            env -u PGPASSWORD -u PGHOST -u PGPORT -u PGUSER -C /tmp "$prog" "$@"
    fi
    exec env -u PGPASSWORD -u PGHOST -u PGPORT -u PGUSER "$prog" "$@"
}

# http_ok PORT PATH: whether GET on 127.0.0.1:PORT answers 200.
http_ok() {
    [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$1$2")" = 200 ]
}

# wait_until SECONDS WHAT COMMAND...: runs COMMAND every 100 ms until it succeeds.
wait_until() {
    local limit=$1 what=$2 end; shift 2
    end=$((SECONDS + limit))
    until "$@"; do
        [ $SECONDS -lt $end ] || { echo "timed out after ${limit}s waiting for $what" >&2; return 1; }
        sleep 0.1
    done
}

# nofile_max: this shell's open-file limit raised to its hard limit (a cap where that is
# unlimited), for the thousands of sockets a many-client run opens; children inherit it.
nofile_max() {
    local hard
    hard=$(ulimit -Hn); [ "$hard" = unlimited ] && hard=1048576
    ulimit -n "$hard"
}

# patroni_start DIR N: etcd and N Patroni nodes (Debian's patroni and etcd-server) on free
# loopback ports under DIR, configured from scripts/patroni-node.yml as the tests' are
# (ttl 10 s, loop_wait 2 s, retry_timeout 5 s); returns once pt0 leads and the others
# stream from it.
# Sets NODE_PORTS, API_PORTS and NODE_DIRS (pt0 first).
patroni_start() {
    local dir=$1 n=$2 client peer i name pg api
    mkdir -p "$dir"
    [ "$(id -u)" -eq 0 ] && chown "$PG_USER" "$dir"
    client=$(free_port); peer=$(free_port)
    (as_pg_exec etcd --name e0 --data-dir "$dir/etcd" \
        --listen-client-urls="http://127.0.0.1:$client" --advertise-client-urls="http://127.0.0.1:$client" \
        --listen-peer-urls="http://127.0.0.1:$peer" --initial-advertise-peer-urls="http://127.0.0.1:$peer" \
        --initial-cluster="e0=http://127.0.0.1:$peer" > "$dir/etcd.log" 2>&1) &
    PIDS+=($!)
    NODE_PORTS=(); API_PORTS=(); NODE_DIRS=(); NODE_PREFIX=pt
    for i in $(seq 0 $((n - 1))); do
        name=pt$i pg=$(free_port) api=$(free_port)
        sed -e "s|@SCOPE@|pgvane-demo|g; s|@NAME@|$name|g; s|@API_PORT@|$api|g" \
            -e "s|@PG_PORT@|$pg|g; s|@ETCD_PORT@|$client|g; s|@DIR@|$dir|g" \
            -e "s|@BIN_DIR@|$(pg_bindir)|g; s|@SUPERUSER@|postgres|g; s|@PASSWORD@|$PGPASSWORD|g" \
            "$PGVANE_ROOT/scripts/patroni-node.yml" > "$dir/$name.yml"
        [ "$(id -u)" -eq 0 ] && chown "$PG_USER" "$dir/$name.yml"
        (as_pg_exec patroni "$dir/$name.yml" > "$dir/$name.log" 2>&1) &
        PIDS+=($!)
        NODE_PORTS+=("$pg"); API_PORTS+=("$api"); NODE_DIRS+=("$dir/$name")
        # pt0 bootstraps alone, so that it is the leader the demo starts with.
        [ "$i" -eq 0 ] && wait_until 90 "pt0 to lead" http_ok "$api" /primary
    done
    for api in "${API_PORTS[@]:1}"; do wait_until 120 "replicas to run" http_ok "$api" /replica; done
    wait_until 60 "replicas to stream" streaming $((n - 1))
}

# streaming N: whether N replicas stream from the node on NODE_PORTS[0].
streaming() {
    [ "$(psql -h 127.0.0.1 -p "${NODE_PORTS[0]}" -U postgres -XAtc \
        "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'" postgres 2>/dev/null)" = "$1" ]
}

# patroni_crash I: node I's Patroni, postmaster and backends frozen, then killed (its leader
# key expires after ttl, as on a machine failure).
patroni_crash() {
    local pm pids
    pm=$(head -n 1 "${NODE_DIRS[$1]}/postmaster.pid")
    pids="$(pgrep -f "patroni ${NODE_DIRS[$1]}.yml") $pm $(pgrep -P "$pm" | tr '\n' ' ')"
    # shellcheck disable=SC2086
    kill -STOP $pids 2>/dev/null || true
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
}

cluster_stop() {
    for d in "${NODE_DIRS[@]+"${NODE_DIRS[@]}"}"; do
        [ -f "$d/postmaster.pid" ] && { pg_run pg_ctl -D "$d" -m immediate -w stop >/dev/null 2>&1 || true; }
    done
    return 0
}

# idle_clients_ready N: builds pgvane and the idle-clients load (benches/idle_clients.rs),
# sets CLIENTS to the latter, and raises the open files limit for N clients as far as the
# hard limit allows (each process needs about N descriptors).
idle_clients_ready() {
    local n=$1 want hard
    cargo build --release --locked --quiet
    cargo bench --locked --no-run --bench idle_clients 2>/dev/null
    CLIENTS=$(ls -t target/release/deps/idle_clients-* | grep -v '\.d$' | head -n 1)
    want=$((n + 1000)); hard=$(ulimit -Hn)
    [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ] && want=$hard
    ulimit -n "$want"
}

# pgvane_config FILE INTERVAL: backends from NODE_PORTS (checked through Patroni's REST API
# on API_PORTS if set, with SQL otherwise); a passthrough listener on RW_PORT (primary), one
# on RO_PORT (replicas) and a transaction-pooling listener on TX_PORT (primary).
pgvane_config() {
    local file=$1 interval=${2:-1s} method=sql
    [ -n "${API_PORTS[*]:-}" ] && method=patroni
    {
        printf '[general]\nmax_client_conn = 20000\n\n'
        printf '[health]\nmethod = "%s"\ninterval = "%s"\n\n[health.sql]\nuser = "postgres"\npassword = "%s"\n' \
            "$method" "$interval" "$PGPASSWORD"
        printf '\n[pool]\ndefault_pool_size = 20\n\n[[user]]\nname = "postgres"\npassword = "%s"\n' "$PGPASSWORD"
        for i in "${!NODE_PORTS[@]}"; do
            printf '\n[[backend]]\nname = "%s%s"\nhost = "127.0.0.1"\nport = %s\n' \
                "${NODE_PREFIX:-pg}" "$i" "${NODE_PORTS[$i]}"
            [ "$method" = patroni ] && printf 'patroni_port = %s\n' "${API_PORTS[$i]}"
        done
        printf '\n[[listener]]\nname = "rw"\naddress = "127.0.0.1"\nport = %s\ntarget = "primary"\n' "$RW_PORT"
        printf '\n[[listener]]\nname = "ro"\naddress = "127.0.0.1"\nport = %s\ntarget = "replica"\nfallback_to_primary = true\n' "$RO_PORT"
        printf '\n[[listener]]\nname = "tx"\naddress = "127.0.0.1"\nport = %s\ntarget = "primary"\nmode = "transaction"\n' "$TX_PORT"
    } > "$file"
}

# pgvane_start NAME [BINARY] [THREADS]: a pgvane (BINARY, default $PGVANE) with
# pgvane_config's listeners on fresh ports, its config and log WORK/NAME.toml and .log,
# worker_threads = THREADS if given, and EXTRA (TOML appended) from the environment; WRAP
# from the environment is a command it runs under (valgrind, say: the pid is still its own).
# Sets PASS_PORT (passthrough, primary), TXN_PORT (transaction pooling) and STARTED_PID.
pgvane_start() {
    local name=$1 binary=${2:-$PGVANE} threads=${3:-}
    RW_PORT=$(free_port); RO_PORT=$(free_port); TX_PORT=$(free_port)
    pgvane_config "$WORK/$name.toml" 1s
    [ -n "$threads" ] && sed -i "s/^max_client_conn = .*/&\nworker_threads = $threads/" "$WORK/$name.toml"
    printf '%s\n' "${EXTRA:-}" >> "$WORK/$name.toml"
    ${WRAP:-} "$binary" --config "$WORK/$name.toml" > "$WORK/$name.log" 2>&1 &
    PIDS+=($!); STARTED_PID=$!
    PASS_PORT=$RW_PORT TXN_PORT=$TX_PORT
}

# haproxy_start: HAProxy (tcp) in front of NODE_PORTS[0] on a free port; sets HAPROXY_PORT
# and HAPROXY_PID.
haproxy_start() {
    HAPROXY_PORT=$(free_port)
    cat > "$WORK/haproxy.cfg" <<CFG
global
    maxconn 8192
defaults
    mode tcp
    timeout client 30m
    timeout server 30m
    timeout connect 4s
listen pg
    bind 127.0.0.1:$HAPROXY_PORT
    server pg0 127.0.0.1:${NODE_PORTS[0]} maxconn 1000
CFG
    haproxy -f "$WORK/haproxy.cfg" -db > "$WORK/haproxy.log" 2>&1 &
    PIDS+=($!); HAPROXY_PID=$!
}

# bench_targets_start: the proxies the benchmarks compare, in front of NODE_PORTS[0] and
# listening: pgvane (PGVANE_PID; PASS passthrough, TXN transaction pooling), pgvane on one
# thread as PgBouncer runs (PGVANE1_PID, TXN1), HAProxy (HAPROXY_PORT, HAPROXY_PID) and
# PgBouncer (BOUNCER_PORT, BOUNCER_PID).
bench_targets_start() {
    pgvane_start pgvane
    PGVANE_PID=$STARTED_PID PASS=$PASS_PORT TXN=$TXN_PORT
    pgvane_start pgvane-1t "$PGVANE" 1
    PGVANE1_PID=$STARTED_PID TXN1=$TXN_PORT
    haproxy_start
    pgbouncer_start "$WORK" 20000
    BOUNCER_PID=$(cat "$WORK/pgbouncer.pid")
    wait_port "$PASS"; wait_port "$TXN"; wait_port "$TXN1"; wait_port "$HAPROXY_PORT"
}

# pgbouncer_start WORK MAX_CLIENTS [EXTRA_SETTINGS]: PgBouncer in transaction mode, pool
# of 20, in front of NODE_PORTS[0], on a free port, with EXTRA_SETTINGS in its
# [pgbouncer] section. Its auth_file holds the SCRAM verifier from pg_authid, so it runs no
# PBKDF2 per client login. Sets BOUNCER_PORT; the pid is in WORK/pgbouncer.pid.
pgbouncer_start() {
    local work=$1 max_clients=$2 extra=${3:-} verifier
    BOUNCER_PORT=$(free_port)
    verifier=$(psql -h 127.0.0.1 -p "${NODE_PORTS[0]}" -U postgres -XAtc \
        "SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'" postgres)
    printf '"postgres" "%s"\n' "$verifier" > "$work/userlist.txt"
    cat > "$work/pgbouncer.ini" <<CFG
[databases]
postgres = host=127.0.0.1 port=${NODE_PORTS[0]} dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $work/userlist.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = $max_clients
logfile = $work/pgbouncer.log
pidfile = $work/pgbouncer.pid
$extra
CFG
    chmod 644 "$work/userlist.txt" "$work/pgbouncer.ini"
    # PgBouncer refuses to run as root; -d daemonizes once it listens.
    if [ "$(id -u)" -eq 0 ]; then
        chown "$PG_USER" "$work"
        runuser -u "$PG_USER" -- bash -c "ulimit -n $(ulimit -n); exec pgbouncer -d $work/pgbouncer.ini" > /dev/null 2>&1
    else
        pgbouncer -d "$work/pgbouncer.ini" > /dev/null 2>&1
    fi
    wait_port "$BOUNCER_PORT"
}

wait_port() {
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on port $1" >&2; return 1
}

# rss PID: the process's resident set, KiB.
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
