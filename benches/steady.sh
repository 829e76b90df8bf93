#!/usr/bin/env bash
# Steady state with many clients: pgvane (transaction pooling, one thread) and PgBouncer
# (same pool of 20) measured in the same windows of a long pgbench run, after an unmeasured
# run through each target and after every client has logged in, so that neither cold
# server connections, the logins nor the start of a run count. Targets take
# turns, first one and then the other leading, round after round: on a shared machine
# whose load moves within minutes, pairs of adjacent windows are what compare.
#
#   benches/steady.sh [-c clients] [-j pgbench threads] [-r rounds] [-W window seconds]
#                     [-w "pgbench flags"] [-p] [-g] [-m]  (default -c 1000 -j 2 -r 4 -W 10 -w -S)
#
# -p pins PostgreSQL to the second CPU and the proxies and pgbench to the first, so that
# what a proxy does to the caches and run queue of the CPUs it shares with PostgreSQL
# shows as the difference between a pinned and an unpinned run. -g puts the proxies,
# PostgreSQL and pgbench in three CPU cgroups of equal weight, as containers or systemd
# services with a CPU weight run them: the scheduler then shares the CPUs between the
# groups first, and a proxy's thread competes with PostgreSQL's backends as one group
# against another. -m adds pgvane with its default threads (one per CPU, tokio's
# work-stealing scheduler) as another target.
#
# Per window and target: tps and latency percentiles of the transactions that ended in it
# (pgbench --log), how evenly the clients were served (transactions per client) and where
# the tail comes from (latencies spread within each 100 ms, or throughput wandering between
# them), CPU per transaction (user/system, microseconds) of the proxy, of the primary's
# PostgreSQL processes and of pgbench, and, where perf can count system calls, the proxy's
# recv, send, epoll_wait and epoll_ctl calls per transaction, PostgreSQL's sleeps (its
# backends' epoll_wait), page faults and moves between CPUs, and pgbench's wake-ups (ppoll)
# per transaction; how often each of the three was preempted per transaction (involuntary
# context switches), and how often the proxy slept (voluntary ones: a thread that rarely
# sleeps was taken off its CPU with work waiting, and the scheduler treats it as a CPU
# hog); the TCP segments sent per transaction (nstat, the whole machine); and
# the proxy's RSS at the window's end, with what it grew per client since the proxy started
# (before any client or server connection). BASELINE=BINARY adds another pgvane build (on
# one thread) as another target.
set -euo pipefail
. "$(dirname "$0")/../scripts/lib.sh"
cd "$PGVANE_ROOT"

CLIENTS=1000 THREADS=2 ROUNDS=4 WINDOW=10 FLAGS=-S PIN="" CGROUPS="" MULTI=""
while getopts "c:j:r:W:w:pgm" o; do
    case $o in
        c) CLIENTS=$OPTARG ;; j) THREADS=$OPTARG ;; r) ROUNDS=$OPTARG ;; W) WINDOW=$OPTARG ;;
        w) FLAGS=$OPTARG ;; p) PIN=1 ;; g) CGROUPS=1 ;; m) MULTI=1 ;;
        *) exit 2 ;;
    esac
done

ensure_postgres
ensure_packages pgbench:postgresql-client python3:python3 pgbouncer:pgbouncer nstat:iproute2
cargo build --release --locked --quiet
nofile_max
PERF=""
perf stat -e syscalls:sys_enter_sendto -- true > /dev/null 2>&1 && PERF=1

work_dir pgvane-steady
cluster_start "$WORK" 0
pgbench -h 127.0.0.1 -p "${NODE_PORTS[0]}" -U postgres -i -s 10 -q postgres > /dev/null 2>&1
pgvane_start pgvane "$PGVANE_ROOT/target/release/pgvane" 1
NAMES=(pgvane-txn-1t) PIDS_OF=("$STARTED_PID") PORTS=("$TXN_PORT")
if [ -n "$MULTI" ]; then
    pgvane_start pgvane-auto "$PGVANE_ROOT/target/release/pgvane"
    NAMES+=(pgvane-txn) PIDS_OF+=("$STARTED_PID") PORTS+=("$TXN_PORT")
fi
if [ -n "${BASELINE:-}" ]; then
    pgvane_start baseline "$BASELINE" 1
    NAMES+=(baseline-txn-1t) PIDS_OF+=("$STARTED_PID") PORTS+=("$TXN_PORT")
fi
pgbouncer_start "$WORK" 20000
NAMES+=(pgbouncer-txn) PIDS_OF+=("$(cat "$WORK/pgbouncer.pid")") PORTS+=("$BOUNCER_PORT")
for p in "${PORTS[@]}"; do wait_port "$p"; done
RSS_START=()
for p in "${PIDS_OF[@]}"; do RSS_START+=("$(rss "$p")"); done
POSTMASTER=$(head -n 1 "${NODE_DIRS[0]}/postmaster.pid")
ON_CPU0=""
if [ -n "$PIN" ]; then
    # Backends forked from now on inherit the postmaster's CPU; the pools' connections,
    # opened later, are among them.
    for p in "$POSTMASTER" $(pgrep -P "$POSTMASTER"); do taskset -pc 1 "$p" > /dev/null; done
    for p in "${PIDS_OF[@]}"; do taskset -a -pc 0 "$p" > /dev/null; done
    ON_CPU0="taskset -c 0"
fi
if [ -n "$CGROUPS" ]; then
    # cgroup v2 with its cpu controller, or v1's cpu hierarchy.
    if grep -qw cpu /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
        CG=/sys/fs/cgroup/pgvane-steady-$$
        echo +cpu > /sys/fs/cgroup/cgroup.subtree_control
        mkdir "$CG" && echo +cpu > "$CG/cgroup.subtree_control"
    elif [ -d /sys/fs/cgroup/cpu ] && [ -f /sys/fs/cgroup/cpu/cpu.shares ]; then
        CG=/sys/fs/cgroup/cpu/pgvane-steady-$$
        mkdir "$CG"
    else
        echo "-g needs a CPU cgroup controller (cgroup v2's cpu, or v1's at /sys/fs/cgroup/cpu)" >&2
        exit 1
    fi
    mkdir "$CG/proxy" "$CG/postgresql" "$CG/pgbench"
    # Removed once every process in them has ended, this shell moved out first.
    trap 'work_cleanup; echo $$ > "${CG%/*}/cgroup.procs"; rmdir "$CG"/{proxy,postgresql,pgbench} "$CG"' EXIT
    for p in "${PIDS_OF[@]}"; do echo "$p" > "$CG/proxy/cgroup.procs"; done
    # Backends forked from now on (the pools' connections among them) stay with the postmaster.
    for p in "$POSTMASTER" $(pgrep -P "$POSTMASTER"); do echo "$p" > "$CG/postgresql/cgroup.procs"; done
    # This shell last: pgbench, started from it, inherits its group.
    echo $$ > "$CG/pgbench/cgroup.procs"
fi

# user and system ticks of the given pids (one that ended counts 0)
ticks() {
    local u=0 s=0 a b p
    for p in "$@"; do
        read -r a b < <(awk '{print $14, $15}' "/proc/$p/stat" 2>/dev/null || echo "0 0")
        u=$((u + a)) s=$((s + b))
    done
    echo "$u $s"
}
# involuntary (preempted) and voluntary (slept) context switches of the given pids'
# threads (one that ended counts 0)
switches() {
    local p
    for p in "$@"; do cat /proc/"$p"/task/*/status 2>/dev/null || true; done |
        awk '/^nonvoluntary_ctxt_switches/ {n += $2} /^voluntary_ctxt_switches/ {v += $2}
             END {print n + 0, v + 0}'
}
# logged_or_gone DIR PID: pgbench in DIR has logged a transaction, or has ended.
logged_or_gone() {
    [ -n "$(find "$1" -name 'pgbench_log.*' -size +0 2>/dev/null)" ] || ! kill -0 "$2" 2>/dev/null
}
SYSCALLS=syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_ctl
RESULTS="$WORK/results"
: > "$RESULTS"
say "pgbench $FLAGS, $CLIENTS clients on $THREADS threads, pool of 20: $ROUNDS rounds of ${WINDOW} s windows${PIN:+, pinned}${CGROUPS:+, a CPU cgroup each for the proxies, PostgreSQL and pgbench}"
# pgbench as every run here calls it; the target's port and the run's length follow.
PGBENCH=($ON_CPU0 pgbench -h 127.0.0.1 -U postgres $FLAGS -n -c "$CLIENTS" -j "$THREADS")
# An unmeasured run through each target first: its pool's connections are opened, and their
# backends have faulted in the shared buffers they touch, before any window (a first round
# measured cold put PostgreSQL's CPU per transaction 15-23 % higher for whichever target ran
# first).
for i in "${!NAMES[@]}"; do
    "${PGBENCH[@]}" -p "${PORTS[$i]}" -T "$WINDOW" postgres > "$WORK/warm-up" 2>&1 ||
        { cat "$WORK/warm-up"; echo "warm-up through ${NAMES[$i]} failed" >&2; exit 1; }
done
for round in $(seq 1 "$ROUNDS"); do
    order=("${!NAMES[@]}")
    [ $((round % 2)) -eq 0 ] && mapfile -t order < <(printf '%s\n' "${!NAMES[@]}" | tac)
    for i in "${order[@]}"; do
        name=${NAMES[$i]} pid=${PIDS_OF[$i]} port=${PORTS[$i]}
        logdir="$WORK/log-$round-$name"
        mkdir -p "$logdir"
        # Stopped once the window has closed and its transactions are logged.
        (cd "$logdir" && exec "${PGBENCH[@]}" -p "$port" -T $((WINDOW + 600)) --log postgres \
            > "$logdir/out" 2>&1) &
        bench=$!
        # The window opens 3 s after the first transaction is logged (or pgbench ended:
        # reported below).
        wait_until 120 "pgbench's first logged transaction" logged_or_gone "$logdir" "$bench"
        sleep 3
        backends=$(pgrep -P "$POSTMASTER" | paste -sd ' ')
        if [ -n "$PERF" ]; then
            perf stat -x, -e "$SYSCALLS" -p "$pid" -o "$logdir/perf.proxy" -- sleep "$WINDOW" &
            perf_proxy=$!
            # The client backends only: a process that ends meanwhile fails perf.
            clients_of_pg=$(ps -o pid=,args= -p "${backends// /,}" | awk '/ postgres postgres 127/ {print $1}' | paste -sd ,)
            perf stat -x, -e syscalls:sys_enter_epoll_wait,page-faults,cpu-migrations \
                -p "$clients_of_pg" \
                -o "$logdir/perf.pg" -- sleep "$WINDOW" > /dev/null 2>&1 &
            perf_pg=$!
            perf stat -x, -e syscalls:sys_enter_ppoll -p "$bench" -o "$logdir/perf.bench" \
                -- sleep "$WINDOW" > /dev/null 2>&1 &
            perf_bench=$!
        fi
        nstat -n > /dev/null
        t0=$(date +%s.%N)
        read -r pu0 ps0 < <(ticks "$pid"); read -r gu0 gs0 < <(ticks $backends "$POSTMASTER")
        read -r bu0 bs0 < <(ticks "$bench")
        read -r pv0 sv0 < <(switches "$pid"); read -r gv0 _ < <(switches $backends)
        read -r bv0 _ < <(switches "$bench")
        sleep "$WINDOW"
        t1=$(date +%s.%N)
        nstat TcpOutSegs > "$logdir/nstat"
        read -r pu1 ps1 < <(ticks "$pid"); read -r gu1 gs1 < <(ticks $backends "$POSTMASTER")
        read -r bu1 bs1 < <(ticks "$bench")
        read -r pv1 sv1 < <(switches "$pid"); read -r gv1 _ < <(switches $backends)
        read -r bv1 _ < <(switches "$bench")
        rss1=$(rss "$pid")
        [ -n "$PERF" ] && { wait "$perf_proxy" "$perf_pg" "$perf_bench" || true; }
        kill -0 "$bench" 2>/dev/null || { cat "$logdir/out"; echo "pgbench ended early" >&2; exit 1; }
        # pgbench writes its log through stdio buffers: a little more for the last lines.
        sleep 2
        kill -TERM "$bench"; wait "$bench" || true
        echo "$round $name $t0 $t1 $((pu1 - pu0)) $((ps1 - ps0)) $((gu1 - gu0)) $((gs1 - gs0)) $((bu1 - bu0)) $((bs1 - bs0)) $((pv1 - pv0)) $((gv1 - gv0)) $((bv1 - bv0)) $((sv1 - sv0)) $rss1 ${RSS_START[$i]} $logdir" >> "$RESULTS"
    done
done

python3 - "$RESULTS" "$(getconf CLK_TCK)" "$CLIENTS" <<'PY'
import glob, statistics, sys
rows, hz, clients = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def perf(path):
    counts = {}
    try:
        for line in open(path):
            f = line.strip().split(",")
            if len(f) > 2 and f[0].isdigit():
                counts[f[2].split("sys_enter_")[-1]] = int(f[0])
    except FileNotFoundError:
        pass
    return counts

table, tails, by_target = [], [], {}
for line in open(rows):
    rnd, name, t0, t1, pu, ps, gu, gs, bu, bs, pv, gv, bv, sv, rss, rss0, logdir = line.split()
    t0, t1 = float(t0), float(t1)
    lat, per_client, buckets = [], {}, {}
    for log in glob.glob(f"{logdir}/pgbench_log.*"):
        for entry in open(log):
            f = entry.split()
            # client, transaction, latency us, script, end time s, end time us
            if len(f) < 6:
                continue
            end = int(f[4]) + int(f[5]) / 1e6
            if t0 <= end < t1:
                lat.append(int(f[2]))
                per_client[f[0]] = per_client.get(f[0], 0) + 1
                buckets.setdefault(int((end - t0) * 10), []).append(int(f[2]) / 1000)
    n = len(lat)
    if n == 0:
        sys.exit(f"{name}, round {rnd}: no transaction ended in the window")
    lat.sort()
    pct = lambda q: lat[min(n - 1, int(q * n))] / 1000
    # Clients that ended no transaction in the window count as 0.
    counts = sorted(list(per_client.values()) + [0] * (int(clients) - len(per_client)))
    # Where the tail comes from: latencies that spread within each 100 ms (the order clients
    # are served in), or throughput that wanders from one 100 ms to the next (and latency
    # with it).
    per_100ms = [len(b) for b in buckets.values()]
    wander = statistics.pstdev(per_100ms) / statistics.mean(per_100ms) * 100
    within = statistics.mean(statistics.pstdev(b) for b in buckets.values())
    between = statistics.pstdev(statistics.mean(b) for b in buckets.values())
    tails.append(f"| {rnd} | {name} | {pct(0.5):.1f} | {pct(0.9):.1f} | {pct(0.99):.1f} | "
                 f"{pct(0.999):.1f} | {lat[-1] / 1000:.1f} | {counts[0]} / "
                 f"{counts[len(counts) // 100]} / {counts[len(counts) // 2]} | {wander:.1f} | "
                 f"{within:.1f} / {between:.1f} |")
    us = lambda ticks: int(ticks) * 1e6 / hz / n
    px, pg = perf(f"{logdir}/perf.proxy"), perf(f"{logdir}/perf.pg")
    calls = (f"{px['recvfrom'] / n:.2f} / {px['sendto'] / n:.2f} / {px['epoll_wait'] / n:.3f}"
             f" / {px['epoll_ctl'] / n:.2f}"
             if px else "n/a")
    sleeps = (f"{pg['epoll_wait'] / n:.2f} / {pg['page-faults'] / n:.2f} / "
              f"{pg['cpu-migrations'] / n:.3f}" if pg else "n/a")
    bench = perf(f"{logdir}/perf.bench")
    wakes = f"{bench['ppoll'] / n:.3f}" if bench else "n/a"
    segs = next((int(l.split()[1]) for l in open(f"{logdir}/nstat") if l.startswith("TcpOutSegs")), 0)
    # RSS at the window's end (MiB), and its growth since the proxy started per client (bytes)
    grown = (int(rss) - int(rss0)) * 1024 / int(clients)
    row = dict(tps=n / (t1 - t0), p50=pct(0.5), p99=pct(0.99),
               proxy=us(pu) + us(ps), pg=us(gu) + us(gs), bench=us(bu) + us(bs),
               rss=int(rss) / 1024, grown=grown)
    by_target.setdefault(name, []).append(row)
    table.append(f"| {rnd} | {name} | {row['tps']:.0f} | {row['p50']:.1f} / {row['p99']:.1f} | "
                 f"{us(pu):.1f} / {us(ps):.1f} | {us(gu):.1f} / {us(gs):.1f} | "
                 f"{us(bu):.1f} / {us(bs):.1f} | {calls} | {sleeps} | {wakes} | "
                 f"{int(pv) / n:.3f} / {int(gv) / n:.3f} / {int(bv) / n:.3f} | {int(sv) / n:.3f} | "
                 f"{segs / n:.2f} | "
                 f"{row['rss']:.1f} / {grown:.0f} |")
print("| round | target | tps | p50 / p99 ms | proxy µs user / sys | PostgreSQL µs user / sys "
      "| pgbench µs user / sys | proxy recv / send / epoll_wait / epoll_ctl per txn "
      "| PostgreSQL sleeps / page faults / CPU migrations per txn | pgbench wake-ups per txn "
      "| preempted per txn: proxy / PostgreSQL / pgbench | proxy sleeps per txn | TCP segments per txn "
      "| proxy RSS MiB / grown per client bytes |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
print("\n".join(table))
print()
# FIFO queueing shows as a narrow spread: every client waits about as long, and ends
# about as many transactions.
print("| round | target | p50 ms | p90 | p99 | p99.9 | max | transactions per client: min / 1st percentile / median "
      "| tps per 100 ms: sd, % of mean | latency sd ms: within each 100 ms / of 100 ms means |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
print("\n".join(tails))
print()
print("Medians: " + "; ".join(
    f"{name}: {statistics.median(r['tps'] for r in rs):.0f} tps, p99 "
    f"{statistics.median(r['p99'] for r in rs):.1f} ms, proxy {statistics.median(r['proxy'] for r in rs):.1f} µs, "
    f"PostgreSQL {statistics.median(r['pg'] for r in rs):.1f} µs, pgbench {statistics.median(r['bench'] for r in rs):.1f} µs, "
    f"RSS {statistics.median(r['rss'] for r in rs):.1f} MiB ({statistics.median(r['grown'] for r in rs):.0f} bytes per client)"
    for name, rs in by_target.items()))
PY
