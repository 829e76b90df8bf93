#!/usr/bin/env bash
# Failovers against the demo stack (docker-compose.yml), to watch pgvane ride through them
# on the dashboard:
#   docker/failover.sh switchover   # planned: PAUSE on pgvane, patronictl switchover, RESUME
#   docker/failover.sh crash        # unplanned: the leader's container is killed, then
#                                   # started again (it rejoins as a replica)
set -euo pipefail
cd "$(dirname "$0")/.."
compose() { docker-compose "$@"; }
leader() {
    compose exec -T pg1 patronictl -c /etc/patroni/patroni.yml list -f json \
        | python3 -c 'import json,sys; print([m["Member"] for m in json.load(sys.stdin) if m["Role"] == "Leader"][0])'
}
admin=http://localhost:9930
case ${1:-} in
    switchover)
        from=$(leader)
        echo "PAUSE on pgvane (answers when running transactions are done)"
        curl -fsS -X POST "$admin/pause"; echo
        echo "switchover away from $from"
        compose exec -T pg1 patronictl -c /etc/patroni/patroni.yml switchover --leader "$from" --force
        # Resumed once pgvane routes to the new leader: held clients then go there.
        for _ in $(seq 1 60); do
            new=$(leader || true)
            [ -n "$new" ] && [ "$new" != "$from" ] && break
            sleep 0.5
        done
        curl -fsS -X POST "$admin/resume"; echo
        echo "new leader: $new"
        ;;
    crash)
        from=$(leader)
        echo "killing $from"
        compose kill "$from"
        sleep 20
        compose start "$from"
        echo "$from restarted (it rejoins as a replica)"
        ;;
    *)
        sed -n '2,7p' "$0" >&2
        exit 2
        ;;
esac
