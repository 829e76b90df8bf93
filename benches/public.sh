#!/usr/bin/env bash
# The public benchmark: pgbench against PostgreSQL directly, through pgvane (passthrough,
# transaction pooling with the default threads and with one thread), through PgBouncer
# (transaction pooling, same pool of 20) and through HAProxy (tcp), all in the same run on
# one local primary + replica, across client counts and workloads, with repetitions.
# Writes a markdown table and PNG charts (tps and p50/p99 latency by client count, CPU per
# transaction) to benches/results/ (or -o DIR).
#
#   benches/public.sh [-T seconds] [-r repetitions] [-c "16 64 256 1000"] [-o DIR]
#                     [-t "pgvane-txn-1t pgbouncer-txn"] [-b BINARY]
#
# -t picks targets by name (direct always runs). -b BINARY adds "baseline-txn-1t": another
# pgvane build with worker_threads = 1, for an A/B of a change within one run.
#
# Latency percentiles come from pgbench --log (every transaction), not from its average.
# CPU per transaction is the proxy process's user + system time over the transactions it
# served (memory per client is benches/idle_rss.sh's: a proxy's RSS after a run keeps what
# earlier runs allocated, so a delta here would mislead). A target that cannot take the clients (PostgreSQL's max_connections is
# 400: direct, HAProxy and passthrough at 1000) is shown as n/a. From 2,000 clients on a
# run lasts at least 30 s: pgbench's clocks include its connections' SCRAM logins, which
# take seconds at that count, and a shorter run would count no transaction at all. The machine is shared:
# compare within a run. Charts need matplotlib, installed into target/bench-venv from
# PyPI when missing.
set -euo pipefail
. "$(dirname "$0")/../scripts/lib.sh"
cd "$PGVANE_ROOT"

DURATION=6 REPS=2 COUNTS="16 64 256 1000" OUT="$PGVANE_ROOT/benches/results" ONLY_T="" BASELINE=""
while getopts "T:r:c:o:t:b:" o; do
    case $o in
        T) DURATION=$OPTARG ;; r) REPS=$OPTARG ;; c) COUNTS=$OPTARG ;; o) OUT=$OPTARG ;;
        t) ONLY_T=$OPTARG ;; b) BASELINE=$OPTARG ;;
        *) exit 2 ;;
    esac
done

ensure_postgres
ensure_packages pgbench:postgresql-client python3:python3 haproxy:haproxy pgbouncer:pgbouncer
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
hard=$(ulimit -Hn); [ "$hard" = unlimited ] && hard=1048576
ulimit -n "$hard"

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
        [ "$name" != direct ] && [[ " $ONLY_T " != *" $name "* ]] && unset "TARGETS[$i]"
    done
    TARGETS=("${TARGETS[@]}")
fi
WORKLOADS=("select-only:-S" "tpcb-like:")

cpu_ticks() { if [ -n "$1" ]; then awk '{print $14 + $15}' "/proc/$1/stat"; else echo 0; fi; }

RESULTS="$WORK/results"
: > "$RESULTS"
total=0
for _ in $COUNTS; do for _ in "${WORKLOADS[@]}"; do for _ in $(seq 1 "$REPS"); do
    total=$((total + ${#TARGETS[@]})); done; done; done
done_runs=0 started=$SECONDS
for clients in $COUNTS; do
    for w in "${WORKLOADS[@]}"; do
        IFS=: read -r wname wflags <<< "$w"
        for rep in $(seq 1 "$REPS"); do
            # Targets interleaved within a repetition, so drift hits them alike.
            for t in "${TARGETS[@]}"; do
                IFS=: read -r name port pid most <<< "$t"
                done_runs=$((done_runs + 1))
                left=$(( (SECONDS - started) * (total - done_runs + 1) / done_runs ))
                printf '\r  [%d/%d, ~%d s left] %-5s clients %-12s %-20s rep %s   ' \
                    "$done_runs" "$total" "$left" "$clients" "$wname" "$name" "$rep"
                if [ "$clients" -gt "$most" ]; then
                    echo "$clients $wname $name na na na na na" >> "$RESULTS"
                    continue
                fi
                logdir="$WORK/log-$clients-$wname-$name-$rep"
                mkdir -p "$logdir"
                cpu0=$(cpu_ticks "$pid")
                duration=$DURATION
                [ "$clients" -ge 2000 ] && [ "$duration" -lt 30 ] && duration=30
                out=$(cd "$logdir" && pgbench -h 127.0.0.1 -p "$port" -U postgres -T "$duration" \
                      -c "$clients" -j 2 -n $wflags --log postgres 2>/dev/null) || out=""
                cpu1=$(cpu_ticks "$pid")
                tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<< "$out")
                txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<< "$out")
                if [ -z "$tps" ] || [ -z "$txns" ] || [ "$txns" -eq 0 ]; then
                    echo "$clients $wname $name failed na na na na" >> "$RESULTS"
                    continue
                fi
                # Latency of every transaction (pgbench --log: third field, microseconds).
                read -r p50 p95 p99 < <(cat "$logdir"/pgbench_log.* | python3 -c '
import sys
v = sorted(int(l.split()[2]) for l in sys.stdin if l.strip())
q = lambda p: v[min(len(v) - 1, int(p * len(v)))] / 1000
print(f"{q(0.50):.2f} {q(0.95):.2f} {q(0.99):.2f}")')
                us=$([ -n "$pid" ] && python3 -c "print(f'{($cpu1 - $cpu0) * 10000 / $txns:.1f}')" || echo na)
                echo "$clients $wname $name $tps $p50 $p95 $p99 $us" >> "$RESULTS"
                rm -rf "$logdir"
            done
        done
    done
done
printf '\n'

mkdir -p "$OUT"
COMMIT="$(git -C "$PGVANE_ROOT" rev-parse --short HEAD)$(git -C "$PGVANE_ROOT" diff --quiet || echo '+')"
"$VENV/bin/python" - "$RESULTS" "$OUT" "$COMMIT" "benches/public.sh -T $DURATION -r $REPS -c \"$COUNTS\"" <<'PY'
import collections, datetime, statistics, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

results, out, commit, command = sys.argv[1:5]
rows = collections.defaultdict(list)
order = []
for line in open(results):
    clients, workload, target, *vals = line.split()
    rows[(int(clients), workload, target)].append(vals)
    if target not in order:
        order.append(target)

def median(key, i):
    vals = [r[i] for r in rows.get(key, [])]
    if not vals or vals[0] == "na":
        return None
    nums = [float(v) for v in vals if v not in ("na", "failed")]
    return statistics.median(nums) if nums else "failed"

counts = sorted({k[0] for k in rows})
workloads = list(dict.fromkeys(k[1] for k in rows))
today = datetime.date.today().isoformat()
md = [f"Measured {today} at commit {commit} with `{command}` (medians; latency from every transaction).", ""]
for w in workloads:
    md += [f"**{w}**", "", "| clients | target | tps | p50 ms | p95 ms | p99 ms | CPU µs/txn |",
           "|---:|---|---:|---:|---:|---:|---:|"]
    for c in counts:
        for t in order:
            cells = [median((c, w, t), i) for i in range(5)]
            fmt = lambda v, f: "n/a" if v is None else ("failed" if v == "failed" else f.format(v))
            md.append(f"| {c} | {t} | " + " | ".join([fmt(cells[0], "{:.0f}"), fmt(cells[1], "{:.2f}"),
                      fmt(cells[2], "{:.2f}"), fmt(cells[3], "{:.2f}"), fmt(cells[4], "{:.1f}")]) + " |")
    md.append("")
open(f"{out}/public.md", "w").write("\n".join(md))

def chart(name, index, ylabel, log=False):
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        for t in order:
            pts = [(c, median((c, w, t), index)) for c in counts]
            pts = [(c, v) for c, v in pts if isinstance(v, float)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=t)
        ax.set_xscale("log")
        ax.set_xticks(counts)
        ax.set_xticklabels([str(c) for c in counts])
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
print("\n".join(md))
PY
say "written: $OUT/public.md, tps.png, p50.png, p99.png, cpu.png"
