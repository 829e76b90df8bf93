//! Hot path of the pooled data path: following message boundaries in forwarded bytes.
//! Reports throughput for a server-to-client stream of typical result messages.

use bytes::{BufMut, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pgvane::protocol::{put_message, Event, Scanner};

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

criterion_group!(benches, scan);
criterion_main!(benches);
