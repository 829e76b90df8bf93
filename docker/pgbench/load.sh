#!/bin/sh
# The demo's load: pgbench through pgvane's transaction listener, for ever, reconnecting
# after anything (a crash shows as failed transactions, never as a stopped generator).
set -u
export PGPASSWORD=demo
until pgbench -h pgvane -p 6433 -U postgres -i -s 10 -q postgres; do sleep 2; done
while true; do
    pgbench -h pgvane -p 6433 -U postgres -c 16 -j 2 -T 60 -P 5 -n postgres || sleep 1
done
