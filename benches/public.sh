#!/usr/bin/env bash
# The public benchmark: pgbench against PostgreSQL directly, through pgvane (passthrough,
# transaction pooling with the default threads and with one thread), through PgBouncer
# (transaction pooling, same pool of 20) and through HAProxy (tcp), all in the same run on
# one local primary + replica, across client counts and workloads, with repetitions.
# Writes a markdown table and PNG charts (tps and p50/p99 latency by client count, CPU per
# transaction) to benches/results/ (or -o DIR).
#
#   benches/public.sh [-T seconds] [-r repetitions] [-c "16 64 256 1000"] [-o DIR]
#                     [-w "select-only churn"] [-t "pgvane-txn-1t pgbouncer-txn"] [-b BINARY] [-n]
#
# -w picks workloads by name, -t targets by name (direct and the baseline always run). -b BINARY adds "baseline-txn-1t": another
# pgvane build with worker_threads = 1, for an A/B of a change within one run. -n skips the
# failover timeline (public.md keeps the one last measured into DIR, dated by its own run).
#
# Workloads: select-only (-S), TPC-B-like, select-only with named prepared statements
# (-M prepared, which PgBouncer 1.18 cannot carry in transaction mode: "failed"), and
# connection churn (-S -C, a SCRAM login per transaction; up to 256 clients, beyond which
# it measures pgbench's own PBKDF2).
#
# The failover timeline: `cargo bench --bench failover -- patroni-crash 1 8` (3 Patroni
# nodes + etcd; pgvane and HAProxy with Patroni's own configuration side by side, 8 writers
# each) writes its commits per 100 ms across the leader's crash; charted as timeline.png.
#
# Latency percentiles come from pgbench --log (every transaction), not from its average.
# CPU per transaction is the proxy process's user + system time over the transactions it
# served, and beside it pgbench's and PostgreSQL's (all nodes): on a machine they share,
# tps follows the sum, and a proxy that paces its replies badly makes pgbench spend more
# (pgbench's includes its clients' SCRAM logins, which dominate at 1,000 clients in a short
# run)
# (memory per client is benches/idle_rss.sh's: a proxy's RSS after a run keeps what
# earlier runs allocated, so a delta here would mislead). A target that cannot take the clients (PostgreSQL's max_connections is
# 400: direct, HAProxy and passthrough at 1000) is shown as n/a. From 1,000 clients on a run
# lasts at least 10 s plus 1 s per 100 clients (1,000: 20 s): pgbench's -T includes its
# connections' SCRAM logins (7 ms of its CPU each on this machine), and a shorter run on a
# busy machine can end before any transaction does ("no transaction"). The machine is shared:
# compare within a run. Charts need matplotlib, installed into target/bench-venv from
# PyPI when missing.
set -euo pipefail
. "$(dirname "$0")/../scripts/lib.sh"
cd "$PGVANE_ROOT"

DURATION=6 REPS=2 COUNTS="16 64 256 1000" OUT="$PGVANE_ROOT/benches/results" ONLY_T="" BASELINE=""
TIMELINE=1 ONLY_W=""
while getopts "T:r:c:o:t:b:nw:" o; do
    case $o in
        T) DURATION=$OPTARG ;; r) REPS=$OPTARG ;; c) COUNTS=$OPTARG ;; o) OUT=$OPTARG ;;
        t) ONLY_T=$OPTARG ;; b) BASELINE=$OPTARG ;; n) TIMELINE="" ;; w) ONLY_W=$OPTARG ;;
        *) exit 2 ;;
    esac
done

ensure_postgres
ensure_packages pgbench:postgresql-client python3:python3 haproxy:haproxy pgbouncer:pgbouncer \
    /usr/bin/time:time
VENV="$PGVANE_ROOT/target/bench-venv"
if ! "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
    say "installing matplotlib (PyPI) into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q matplotlib
fi
cargo build --release --locked --quiet
PGVANE="$PGVANE_ROOT/target/release/pgvane"
# 1000 clients need as many sockets in pgbench and in each proxy (twice, for a pooler's
# clients and servers); PgBouncer gets it through pgbouncer_start.
nofile_max

work_dir pgvane-public
say "cluster: primary + replica, scale 10"
cluster_start "$WORK" 1
DIRECT=${NODE_PORTS[0]}

bench_targets_start
pgbench -h 127.0.0.1 -p "$DIRECT" -U postgres -i -s 10 -q postgres > /dev/null 2>&1

# name:port:pid (no pid: direct) and the most clients the target can take.
TARGETS=("direct:$DIRECT::400" "haproxy:$HAPROXY_PORT:$HAPROXY_PID:400"
         "pgvane-passthrough:$PASS:$PGVANE_PID:400" "pgvane-txn:$TXN:$PGVANE_PID:20000"
         "pgvane-txn-1t:$TXN1:$PGVANE1_PID:20000" "pgbouncer-txn:$BOUNCER_PORT:$BOUNCER_PID:20000")
if [ -n "$BASELINE" ]; then
    pgvane_start baseline "$BASELINE" 1
    wait_port "$TXN_PORT"
    TARGETS+=("baseline-txn-1t:$TXN_PORT:$STARTED_PID:20000")
fi
if [ -n "$ONLY_T" ]; then
    for i in "${!TARGETS[@]}"; do
        name=${TARGETS[$i]%%:*}
        case $name in direct|baseline-txn-1t) continue ;; esac
        [[ " $ONLY_T " != *" $name "* ]] && unset "TARGETS[$i]"
    done
    TARGETS=("${TARGETS[@]}")
fi
# name:pgbench flags:most clients
WORKLOADS=("select-only:-S:" "tpcb-like::" "prepared:-S -M prepared:" "churn:-S -C:256")
if [ -n "$ONLY_W" ]; then
    for i in "${!WORKLOADS[@]}"; do
        [[ " $ONLY_W " != *" ${WORKLOADS[$i]%%:*} "* ]] && unset "WORKLOADS[$i]"
    done
    WORKLOADS=("${WORKLOADS[@]}")
fi

cpu_ticks() { if [ -n "$1" ]; then awk '{print $14 + $15}' "/proc/$1/stat"; else echo 0; fi; }
# PostgreSQL's CPU (every node): each postmaster's own and its reaped children's, and its
# live children's (a pool's server connections live through the runs).
pg_ticks() {
    local pm total=0
    for d in "${NODE_DIRS[@]}"; do
        pm=$(head -n 1 "$d/postmaster.pid")
        total=$((total + $(awk '{print $14 + $15 + $16 + $17}' "/proc/$pm/stat")))
        for c in $(pgrep -P "$pm"); do
            total=$((total + $(awk '{print $14 + $15}' "/proc/$c/stat" 2>/dev/null || echo 0)))
        done
    done
    echo "$total"
}
# Waits (up to 5 s) while the primary's postmaster still reaps the backends of connections
# that just closed (direct ones end with pgbench): pg_ticks counts their CPU only then.
until_reaped() {
    local pm before now
    pm=$(head -n 1 "${NODE_DIRS[0]}/postmaster.pid")
    before=$(pgrep -c -P "$pm" || true)
    for _ in $(seq 25); do
        sleep 0.2
        now=$(pgrep -c -P "$pm" || true)
        [ "$now" -lt "$before" ] || return 0
        before=$now
    done
}

RESULTS="$WORK/results"
: > "$RESULTS"
total=0
for clients in $COUNTS; do for w in "${WORKLOADS[@]}"; do
    most=${w##*:}; [ -n "$most" ] && [ "$clients" -gt "$most" ] && continue
    total=$((total + REPS * ${#TARGETS[@]})); done; done
done_runs=0 started=$SECONDS
for clients in $COUNTS; do
    for w in "${WORKLOADS[@]}"; do
        IFS=: read -r wname wflags wmost <<< "$w"
        [ -n "$wmost" ] && [ "$clients" -gt "$wmost" ] && continue
        for rep in $(seq 1 "$REPS"); do
            # Targets interleaved within a repetition, so drift hits them alike.
            for t in "${TARGETS[@]}"; do
                IFS=: read -r name port pid most <<< "$t"
                done_runs=$((done_runs + 1))
                left=$(( (SECONDS - started) * (total - done_runs + 1) / done_runs ))
                printf '\r  [%d/%d, ~%d s left] %-5s clients %-12s %-20s rep %s   ' \
                    "$done_runs" "$total" "$left" "$clients" "$wname" "$name" "$rep"
                if [ "$clients" -gt "$most" ]; then
                    echo "$clients $wname $name na na na na na na na" >> "$RESULTS"
                    continue
                fi
                logdir="$WORK/log-$clients-$wname-$name-$rep"
                mkdir -p "$logdir"
                cpu0=$(cpu_ticks "$pid") pg0=$(pg_ticks)
                duration=$DURATION least=$((10 + clients / 100))
                [ "$clients" -ge 1000 ] && [ "$duration" -lt "$least" ] && duration=$least
                out=$(cd "$logdir" && /usr/bin/time -f "%U %S" -o "$logdir/time" pgbench -h 127.0.0.1 -p "$port" -U postgres -T "$duration" \
                      -c "$clients" -j 2 -n $wflags --log postgres 2>"$logdir/stderr") || out=""
                until_reaped
                cpu1=$(cpu_ticks "$pid") pg1=$(pg_ticks)
                tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<< "$out")
                txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<< "$out")
                # A run fails on any error pgbench reports, even one it carries on after: a
                # PREPARE refused ("already exists") leaves the client running on whatever
                # server connection happens to hold a statement of that name, which is not
                # what the row claims to measure.
                why=""
                if [ "${txns:-}" = 0 ]; then
                    why="no transaction ended within the $duration s run (pgbench's CPU: $(awk '{print $1 + $2}' "$logdir/time") s, its logins)"
                elif [ -z "$tps" ] || [ -z "$txns" ] || grep -qi error "$logdir/stderr"; then
                    why=$(grep -m 1 . "$logdir/stderr" || echo "pgbench said nothing")
                fi
                if [ -n "$why" ]; then
                    echo "$clients $wname $name failed na na na na na na" >> "$RESULTS"
                    # Why, kept in the output: the work directory goes at the end.
                    printf '\n  failed: %s\n' "$why"
                    continue
                fi
                # Latency of every transaction (pgbench --log: third field, microseconds).
                read -r p50 p95 p99 < <(cat "$logdir"/pgbench_log.* | python3 -c '
import sys
v = sorted(int(l.split()[2]) for l in sys.stdin if l.strip())
q = lambda p: v[min(len(v) - 1, int(p * len(v)))] / 1000
print(f"{q(0.50):.2f} {q(0.95):.2f} {q(0.99):.2f}")')
                us=$([ -n "$pid" ] && python3 -c "print(f'{($cpu1 - $cpu0) * 10000 / $txns:.1f}')" || echo na)
                read -r bench_user bench_sys < "$logdir/time"
                read -r bench_us pg_us < <(python3 -c "
n = $txns
print(f'{($bench_user + $bench_sys) * 1e6 / n:.1f} {($pg1 - $pg0) * 1e4 / n:.1f}')")
                echo "$clients $wname $name $tps $p50 $p95 $p99 $us $bench_us $pg_us" >> "$RESULTS"
                rm -rf "$logdir"
            done
        done
    done
done
printf '\n'

if [ -n "$TIMELINE" ]; then
    ensure_packages patroni:patroni etcd:etcd-server
    say "failover timeline: Patroni crash, pgvane and HAProxy side by side"
    PGVANE_TIMELINE="$WORK/timeline.csv" cargo bench --locked --quiet --bench failover -- \
        patroni-crash 1 8 > "$WORK/failover.md"
fi

mkdir -p "$OUT"
COMMIT="$(git -C "$PGVANE_ROOT" rev-parse --short HEAD)$(git -C "$PGVANE_ROOT" diff --quiet || echo '+')"
"$VENV/bin/python" - "$RESULTS" "$OUT" "$COMMIT" "benches/public.sh -T $DURATION -r $REPS -c \"$COUNTS\"" "$WORK" <<'PY'
import collections, datetime, os, statistics, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker

results, out, commit, command, work = sys.argv[1:6]
rows = collections.defaultdict(list)
order = []
for line in open(results):
    clients, workload, target, *vals = line.split()
    rows[(int(clients), workload, target)].append(vals)
    if target not in order:
        order.append(target)

def median(key, i):
    reps = rows.get(key, [])
    # A target that failed any repetition is shown as failed, not by its other runs.
    if any(r[0] == "failed" for r in reps):
        return "failed" if i == 0 else None
    vals = [r[i] for r in reps]
    if not vals or vals[0] == "na":
        return None
    return statistics.median(float(v) for v in vals)

counts = sorted({k[0] for k in rows})
workloads = list(dict.fromkeys(k[1] for k in rows))
today = datetime.date.today().isoformat()
md = [f"Measured {today} at commit {commit} with `{command}` (medians; latency from every transaction).", ""]
timeline = f"{work}/timeline.csv"
if os.path.exists(timeline):
    md += [f"**Failover** (measured {today} at commit {commit}; Patroni leader crash; 8 writers through",
           "each proxy, one INSERT each per 20 ms; commits per 100 ms in timeline.png)", "",
           open(f"{work}/failover.md").read().strip(), ""]
elif os.path.exists(f"{out}/public.md"):
    # A run without the timeline (-n) keeps the one measured last, dated by its own run, as
    # timeline.png stays.
    blocks = open(f"{out}/public.md").read().split("\n\n")
    start = next((i for i, b in enumerate(blocks) if b.startswith("**Failover**")), None)
    if start is not None:
        end = next((i for i in range(start + 1, len(blocks)) if blocks[i].startswith("**")), len(blocks))
        md += ["\n\n".join(blocks[start:end]).strip(), ""]
for w in workloads:
    md += [f"**{w}**", "", "| clients | target | tps | p50 ms | p95 ms | p99 ms | CPU µs/txn: proxy | pgbench | PostgreSQL |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in counts:
        for t in order:
            if (c, w, t) not in rows:
                continue
            cells = [median((c, w, t), i) for i in range(7)]
            fmt = lambda v, f: "n/a" if v is None else ("failed" if v == "failed" else f.format(v))
            md.append(f"| {c} | {t} | " + " | ".join([fmt(cells[0], "{:.0f}"), fmt(cells[1], "{:.2f}"),
                      fmt(cells[2], "{:.2f}"), fmt(cells[3], "{:.2f}"), fmt(cells[4], "{:.1f}"),
                      fmt(cells[5], "{:.1f}"), fmt(cells[6], "{:.1f}")]) + " |")
    md.append("")
open(f"{out}/public.md", "w").write("\n".join(md))

def chart(name, index, ylabel, log=False):
    cols = min(2, len(workloads))
    lines = -(-len(workloads) // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(6 * cols, 4 * lines), squeeze=False)
    for ax in axes.flat[len(workloads):]:
        ax.set_visible(False)
    for ax, w in zip(axes.flat, workloads):
        for t in order:
            pts = [(c, median((c, w, t), index)) for c in counts]
            pts = [(c, v) for c, v in pts if isinstance(v, float)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=t)
        ax.set_xscale("log")
        ticks = [c for c in counts if any((c, w, t) in rows for t in order)]
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(c) for c in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if log:
            ax.set_yscale("log")
        ax.set_title(w)
        ax.set_xlabel("clients")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"pgvane public benchmark, {today}, commit {commit}")
    fig.tight_layout()
    fig.savefig(f"{out}/{name}.png", dpi=90)

chart("tps", 0, "transactions per second")
chart("p50", 1, "p50 latency, ms", log=True)
chart("p99", 3, "p99 latency, ms", log=True)
chart("cpu", 4, "proxy CPU per transaction, µs")

if os.path.exists(timeline):
    lines = open(timeline).read().splitlines()
    promoted = int(lines[0].split("=")[1]) / 1000
    series = collections.defaultdict(list)
    for line in lines[2:]:
        proxy, ms, n = line.split(",")
        series[proxy].append((int(ms) / 1000, int(n)))
    fig, ax = plt.subplots(figsize=(10, 4))
    for proxy, pts in series.items():
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", label=proxy)
    ax.axvline(0, color="red", linestyle="--", label="leader crashed")
    ax.axvline(promoted, color="green", linestyle="--", label="new leader promoted")
    ax.set_xlabel("seconds after the crash")
    ax.set_ylabel("commits per 100 ms")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Failover timeline (Patroni crash), {today}, commit {commit}")
    fig.tight_layout()
    fig.savefig(f"{out}/timeline.png", dpi=90)
print("\n".join(md))
PY
say "written: $OUT/public.md, tps.png, p50.png, p99.png, cpu.png${TIMELINE:+, timeline.png}"
