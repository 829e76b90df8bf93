"""Driver workloads for pgvane's driver matrix (tests/drivers.rs).

    python workload.py psycopg|asyncpg PORT CLIENTS

Each of CLIENTS concurrent connections reuses prepared statements across many
transactions (more clients than the pool has server connections, so statements meet
other server connections), copies rows in with COPY, pipelines where the driver can, and
checks every answer. Exits non-zero with the reason on the first wrong answer or error.
"""
import asyncio
import sys
import threading

PASSWORD = "pgvane-test"
ROUNDS = 40


def check(got, want, what):
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


def psycopg_client(port, n, errors):
    import psycopg

    try:
        dsn = f"host=127.0.0.1 port={port} user=postgres password={PASSWORD} dbname=app"
        # prepare_threshold=0: every statement is prepared on the server (named).
        with psycopg.connect(dsn, prepare_threshold=0, autocommit=True) as conn:
            for i in range(ROUNDS):
                row = conn.execute("SELECT %s::int + 1", (i,)).fetchone()
                check(row[0], i + 1, "prepared select")
                with conn.transaction():
                    conn.execute("INSERT INTO drv VALUES (%s, %s)", (n, f"tx {i}"))
                    row = conn.execute("SELECT count(*) FROM drv WHERE client = %s", (n,)).fetchone()
                    check(row[0], i + 1, "count inside the transaction")
            with conn.cursor() as cur:
                with cur.copy("COPY drv_copy (client, note) FROM STDIN") as copy:
                    for i in range(2000):
                        copy.write_row((n, f"copied {i}"))
            row = conn.execute("SELECT count(*) FROM drv_copy WHERE client = %s", (n,)).fetchone()
            check(row[0], 2000, "rows copied")
            with conn.pipeline():
                curs = [conn.execute("SELECT %s::int * 2", (i,)) for i in range(50)]
            check([c.fetchone()[0] for c in curs], [i * 2 for i in range(50)], "pipeline")
    except Exception as e:  # reported by the main thread
        errors.append(f"client {n}: {e!r}")


async def asyncpg_client(port, n):
    import asyncpg

    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres",
                                 password=PASSWORD, database="app")
    try:
        for i in range(ROUNDS):
            check(await conn.fetchval("SELECT $1::int + 1", i), i + 1, "prepared select")
            async with conn.transaction():
                await conn.execute("INSERT INTO drv VALUES ($1, $2)", n, f"tx {i}")
                got = await conn.fetchval("SELECT count(*) FROM drv WHERE client = $1", n)
                check(got, i + 1, "count inside the transaction")
        await conn.executemany("INSERT INTO drv VALUES ($1, $2)",
                               [(n, f"many {i}") for i in range(500)])
        got = await conn.fetchval("SELECT count(*) FROM drv WHERE client = $1", n)
        check(got, ROUNDS + 500, "rows after executemany")
        await conn.copy_records_to_table("drv_copy", columns=["client", "note"],
                                         records=[(n, f"copied {i}") for i in range(2000)])
        got = await conn.fetchval("SELECT count(*) FROM drv_copy WHERE client = $1", n)
        check(got, 2000, "rows copied")
    finally:
        await conn.close()


def main():
    driver, port, clients = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if driver == "psycopg":
        errors = []
        threads = [threading.Thread(target=psycopg_client, args=(port, n, errors))
                   for n in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            sys.exit("\n".join(errors))
    elif driver == "asyncpg":
        async def all_clients():
            await asyncio.gather(*(asyncpg_client(port, n) for n in range(clients)))
        asyncio.run(all_clients())
    else:
        sys.exit(f"unknown driver {driver}")
    print(f"{driver}: {clients} clients done")


main()
