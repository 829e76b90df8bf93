//! Cost of the limit checks on the accept and transaction paths: per-address admission
//! (pingora-limits sketches: rate and open connections) and per-user transaction pacing
//! (governor's keyed token bucket), single-threaded and with every core contending.
//!
//!   cargo bench --bench limits

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use pgvane::config::LimitsConfig;
use pgvane::limits::{AddressLimits, UserLimits};

fn limits() -> LimitsConfig {
    let text = "ip_connection_rate = \"1000000/s\"\nip_max_connections = 1000000\n\
                user_transaction_rate = \"100000000/s\"\nuser_transaction_burst = 100000000\n";
    toml::from_str(text).expect("valid limits")
}

/// Address `i` of a /16: many distinct keys, as a flood from many sources.
fn address(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (i & 0xffff)))
}

/// Time per call of `check` as each of `threads` threads sees it, all calling at once,
/// `per_thread` calls each.
fn contended(threads: usize, per_thread: u32, check: impl Fn(u32) + Sync) -> Duration {
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let check = &check;
            s.spawn(move || {
                for i in 0..per_thread {
                    check(i.wrapping_mul(threads as u32) + t as u32);
                }
            });
        }
    });
    started.elapsed() / per_thread
}

fn bench(c: &mut Criterion) {
    let config = limits();
    let addresses = AddressLimits::new(&config);
    let users = std::sync::Arc::new(UserLimits::new(&config, &[], None));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());

    let mut group = c.benchmark_group("limits");
    group.bench_function("address admit (rate + open), 1 thread", |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            drop(addresses.admit(address(i)));
        })
    });
    group.bench_function(format!("address admit, {cores} threads"), |b| {
        b.iter_custom(|n| {
            let per = (n as u32 / cores as u32).max(1);
            contended(cores, per, |i| drop(addresses.admit(address(i)))) * n as u32
        })
    });
    let (app, report): (std::sync::Arc<str>, std::sync::Arc<str>) = ("app".into(), "report".into());
    group.bench_function("user transaction turn, 1 thread", |b| {
        b.iter(|| assert!(users.transaction_turn(&app).is_none()))
    });
    group.bench_function(format!("user transaction turn, {cores} threads"), |b| {
        b.iter_custom(|n| {
            let per = (n as u32 / cores as u32).max(1);
            let turn = |i: u32| {
                let user = if i % 2 == 0 { &app } else { &report };
                assert!(users.transaction_turn(user).is_none());
            };
            contended(cores, per, turn) * n as u32
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
