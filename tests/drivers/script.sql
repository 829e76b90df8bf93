-- psql workload for pgvane's driver matrix (tests/drivers.rs), run with ON_ERROR_STOP.
TRUNCATE drv, drv_copy;
BEGIN;
INSERT INTO drv VALUES (1, 'psql');
PREPARE one_more (int) AS SELECT $1 + 1;
EXECUTE one_more (41);
COMMIT;
COPY drv_copy (client, note) FROM STDIN;
1	first
1	second
\.
SELECT count(*) = 2 AND (SELECT count(*) FROM drv) = 1 AS ok FROM drv_copy \gset
\if :ok
\echo psql: done
\else
SELECT 1 / 0 AS wrong_counts;
\endif
