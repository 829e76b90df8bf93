"""The demo's live view: one line a second while the failover runs, read from pgvane's
admin API and the demo's writer log, with the crash, the promotion and the first write
after it marked as they happen, and a summary at the end.

    python3 scripts/demo_view.py ADMIN_PORT WORK_DIR SECONDS

WORK_DIR/events gets "crash TIME" and "promote TIME" lines from the demo;
WORK_DIR/writer.log has "TIME ok|fail" per write through the primary listener.
"""
import json
import sys
import time
import urllib.request

port, work, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])


def get(path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


def metrics():
    """Sums of each metric over its series, and pool series by state."""
    out, body = {}, get("/metrics") or ""
    for line in body.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name_labels, value = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0]
        try:
            v = float(value)
        except ValueError:
            continue
        out[name] = out.get(name, 0.0) + v
        if name == "pgvane_pool_server_connections" or name == "pgvane_pool_clients":
            state = name_labels.split('state="', 1)[1].split('"', 1)[0]
            key = f"{name}:{state}"
            out[key] = out.get(key, 0.0) + v
    return out


def primary():
    body = get("/status")
    if body is None:
        return "?"
    election = json.loads(body).get("election", {})
    return election.get("primary") or election.get("state", "?")


def lines(path):
    try:
        with open(path) as f:
            return [l.split() for l in f if l.strip()]
    except OSError:
        return []


start = time.time()
prev, prev_at = metrics(), time.time()
marked, promoted_at, first_write = set(), None, None
samples = []
print(f"    {'time':>5} {'txn/s':>7} {'writes':>7} {'failed':>6} {'errors':>6} {'held':>4} "
      f"{'primary':>8} {'pool busy/idle':>14} {'waiting':>7}")
while time.time() - start < seconds:
    time.sleep(max(0.0, 1.0 - (time.time() - prev_at)))
    now_at = time.time()
    now = metrics()
    dt = now_at - prev_at
    tps = (now.get("pgvane_database_transactions_total", 0) - prev.get("pgvane_database_transactions_total", 0)) / dt
    errors = now.get("pgvane_client_errors_total", 0) - prev.get("pgvane_client_errors_total", 0)
    writes = lines(f"{work}/writer.log")
    recent = [s for t, s in writes if prev_at < float(t) <= now_at]
    for kind, at in lines(f"{work}/events"):
        if kind not in marked:
            marked.add(kind)
            what = {"crash": "the primary is killed (kill -9)", "promote": "the replica is promoted"}[kind]
            print(f"    ---- {float(at) - start:5.1f}s {what}")
            if kind == "promote":
                promoted_at = float(at)
    if promoted_at and first_write is None:
        after = [float(t) for t, s in writes if s == "ok" and float(t) > promoted_at]
        if after:
            first_write = after[0]
            print(f"    ---- {first_write - start:5.1f}s first write through pgvane, "
                  f"{1000 * (first_write - promoted_at):.0f} ms after the promotion")
    busy = now.get("pgvane_pool_server_connections:active", 0)
    idle = now.get("pgvane_pool_server_connections:idle", 0)
    waiting = now.get("pgvane_pool_clients:waiting", 0)
    held = now.get("pgvane_held_clients", 0)
    print(f"    {now_at - start:5.1f} {tps:7.0f} {recent.count('ok'):7d} {recent.count('fail'):6d} "
          f"{errors:6.0f} {held:4.0f} {primary():>8} {f'{busy:.0f}/{idle:.0f}':>14} {waiting:7.0f}",
          flush=True)
    samples.append(tps)
    prev, prev_at = now, now_at

writes = lines(f"{work}/writer.log")
ok = sum(1 for _, s in writes if s == "ok")
failed = sum(1 for _, s in writes if s == "fail")
times = [float(t) for t, s in writes if s == "ok"]
gap = max((b - a for a, b in zip(times, times[1:])), default=0)
print(f"    summary: {ok} writes through the primary listener, {failed} failed, longest gap "
      f"between two writes {1000 * gap:.0f} ms; transaction pooling {max(samples, default=0):.0f} txn/s at best")
