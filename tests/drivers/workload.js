// node-postgres workload for pgvane's driver matrix (tests/drivers.rs).
//
//     node workload.js PORT CLIENTS
//
// Each client reuses named prepared statements across many transactions and checks every
// answer (node-postgres has no COPY of its own, and sends one query at a time).
const { Client } = require('pg');

const ROUNDS = 40;

function check(got, want, what) {
  if (String(got) !== String(want)) throw new Error(`${what}: got ${got}, want ${want}`);
}

async function client(port, n) {
  const c = new Client({ host: '127.0.0.1', port, user: 'postgres', password: 'pgvane-test', database: 'app' });
  await c.connect();
  try {
    for (let i = 0; i < ROUNDS; i++) {
      const r = await c.query({ name: 'plus_one', text: 'SELECT $1::int + 1 AS v', values: [i] });
      check(r.rows[0].v, i + 1, 'named prepared select');
      await c.query('BEGIN');
      await c.query({ name: 'insert', text: 'INSERT INTO drv VALUES ($1, $2)', values: [n, `tx ${i}`] });
      const count = await c.query({ name: 'count', text: 'SELECT count(*) AS n FROM drv WHERE client = $1', values: [n] });
      check(count.rows[0].n, i + 1, 'count inside the transaction');
      await c.query('COMMIT');
    }
  } finally {
    await c.end();
  }
}

async function main() {
  const [port, clients] = [Number(process.argv[2]), Number(process.argv[3])];
  await Promise.all([...Array(clients).keys()].map((n) => client(port, n)));
  console.log(`node-postgres: ${clients} clients done`);
}

main().catch((e) => { console.error(e); process.exit(1); });
