//! Hot path of the pooled data path: following message boundaries in forwarded bytes, and
//! the look a transaction-mode link takes at each query for session state. Reports
//! throughput for a server-to-client stream of typical result messages, and time per look
//! at typical queries.

use bytes::{BufMut, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pgvane::protocol::{put_message, Event, Scanner};
use pgvane::proxy::session_state::{look, Carried};

/// A result set as PostgreSQL sends it: RowDescription, `rows` DataRows, CommandComplete,
/// ReadyForQuery.
fn result_stream(rows: usize, row_len: usize) -> Vec<u8> {
    let mut b = BytesMut::new();
    put_message(&mut b, b'T', |m| m.put_slice(&[0; 60]));
    for _ in 0..rows {
        put_message(&mut b, b'D', |m| m.put_slice(&vec![b'x'; row_len]));
    }
    put_message(&mut b, b'C', |m| m.put_slice(b"SELECT 1\0"));
    put_message(&mut b, b'Z', |m| m.put_u8(b'I'));
    b.to_vec()
}

fn scan(c: &mut Criterion) {
    let mut group = c.benchmark_group("scanner");
    for (name, rows, row_len) in [("small rows", 1000, 20), ("large rows", 100, 2000)] {
        let stream = result_stream(rows, row_len);
        group.throughput(Throughput::Bytes(stream.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut s = Scanner::new(b"ZS");
                let mut ready = 0;
                // 8 KiB reads, as the link does.
                for chunk in stream.chunks(8192) {
                    s.feed(chunk, |e| {
                        if let Event::Complete { tag: b'Z', .. } = e {
                            ready += 1;
                        }
                    })
                    .unwrap();
                }
                assert_eq!(ready, 1);
            })
        });
    }
    group.finish();
}

/// Queries as clients send them: pgbench's (TPC-B-like and -S), an ORM's SELECT with many
/// identifiers, a SET of a reported parameter. None creates session state.
const QUERIES: &[(&str, &str)] = &[
    (
        "pgbench update",
        "UPDATE pgbench_accounts SET abalance = abalance + -4120 WHERE aid = 853702;",
    ),
    (
        "pgbench insert",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) \
         VALUES (71, 8, 853702, -4120, CURRENT_TIMESTAMP);",
    ),
    (
        "pgbench select",
        "SELECT abalance FROM pgbench_accounts WHERE aid = 853702;",
    ),
    (
        "orm select",
        "SELECT users.id AS users_id, users.email AS users_email, users.created_at AS \
         users_created_at, users.last_login_at AS users_last_login_at FROM users \
         WHERE users.id = $1 AND users.deleted_at IS NULL",
    ),
    ("set reported", "SET application_name = 'worker-7'"),
];

fn session_state_look(c: &mut Criterion) {
    let mut group = c.benchmark_group("session state look");
    let reported = ["application_name".to_string(), "TimeZone".to_string()];
    let carried = Carried {
        reported: &reported,
        extra: &[],
    };
    for (name, sql) in QUERIES {
        group.bench_function(*name, |b| {
            b.iter(|| {
                let found = look(std::hint::black_box(sql.as_bytes()), carried);
                assert_eq!(found.state, None);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, scan, session_state_look);
criterion_main!(benches);
