//! A randomized oracle for the pooled data path.
//!
//! Many clients share a small pool, each running a seeded random script: simple queries,
//! extended-protocol statements (unnamed, and named ones re-used across transactions),
//! pipelines with several Syncs and an error in the middle, transaction blocks with
//! savepoints, COPY in and out (large rows too), large results, a cancelled pg_sleep,
//! DISCARD ALL / DEALLOCATE ALL, and leaving at random points (Terminate mid-transaction, a
//! half-sent message, a plain hang-up). Every write is split at random byte boundaries
//! with random pauses, and the start of the next request sometimes goes out with the end
//! of the one before. Each client's answers through pgvane (session and transaction
//! listeners) must equal what the same script gets on a direct connection, message for
//! message; afterwards no server connection may be left working or inside a transaction.
//!
//! `PGVANE_ORACLE_SEEDS` sets how many seeds run (6 by default; `benches/soak.sh` runs
//! many), `PGVANE_ORACLE_FIRST_SEED` the first (to re-run a failing one), and
//! `PGVANE_ORACLE_LOG_STATEMENTS` has the server log every statement (printed on failure).

mod common;

use std::time::Duration;

use common::raw::*;
use common::*;
use futures_util::future::join_all;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Clients per seed: several times the pool.
const CLIENTS: usize = 12;
/// Of them, session-mode clients (each holds a server connection while it runs).
const SESSION_CLIENTS: usize = 2;
const POOL: usize = 4;
const STEPS: usize = 30;

/// One step of a client's script.
enum Step {
    /// Bytes to send; the answers end with the `readies`-th ReadyForQuery.
    Request { bytes: Vec<u8>, readies: usize },
    /// A query cancelled while it runs: CancelRequests are sent until its answer comes.
    Cancelled { bytes: Vec<u8> },
    /// The client's last bytes (a Terminate, a half message, or nothing), then it hangs up.
    Leave { bytes: Vec<u8> },
}

fn request(bytes: impl AsRef<[u8]>, readies: usize) -> Step {
    Step::Request {
        bytes: bytes.as_ref().to_vec(),
        readies,
    }
}

fn copy_done() -> Vec<u8> {
    vec![b'c', 0, 0, 0, 4]
}

fn close_statement(name: &str) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    postgres_protocol::message::frontend::close(b'S', name, &mut out).unwrap();
    out.to_vec()
}

/// Extended-protocol Parse, Bind and Execute of `sql` on the unnamed statement, no Sync.
fn unsynced(sql: &str) -> Vec<u8> {
    let mut all = extended("", sql).to_vec();
    all.truncate(all.len() - 5);
    all
}

/// The script of client `client` for `seed`, on table `table`. The random choices depend on
/// the seed and the client only, so the direct and the proxied run get the same script.
fn script(seed: u64, client: usize, table: &str) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed * 1000 + client as u64);
    let mut steps = Vec::new();
    while steps.len() < STEPS {
        let n: u32 = rng.random_range(0..1000);
        let k: u32 = rng.random_range(0..4);
        match rng.random_range(0..20) {
            0 => steps.push(request(query(&format!("SELECT {n}")), 1)),
            1 => steps.push(request(
                query(&format!("INSERT INTO {table} VALUES ({n}, 'note {n}')")),
                1,
            )),
            2 => steps.push(request(
                query(&format!(
                    "SELECT count(*), coalesce(sum(id), 0) FROM {table}"
                )),
                1,
            )),
            3 => steps.push(request(
                query(&format!("SELECT {n}; SELECT 1/0; SELECT 2")),
                1,
            )),
            4 => steps.push(request(extended("", &format!("SELECT {n}")), 1)),
            5 => steps.push(request(
                [
                    parse(
                        &format!("s{k}"),
                        &format!("SELECT {k}, count(*) FROM {table}"),
                    ),
                    sync(),
                ]
                .concat(),
                1,
            )),
            6 | 7 => steps.push(request(bind_execute_sync(&format!("s{k}")), 1)),
            8 => steps.push(request(
                [close_statement(&format!("s{k}")), sync().to_vec()].concat(),
                1,
            )),
            // Three synced requests at once, the middle one failing.
            9 => steps.push(request(
                [
                    extended("", &format!("SELECT {n}")),
                    extended("", "SELECT 1/0"),
                    bind_execute_sync(&format!("s{k}")),
                ]
                .concat(),
                3,
            )),
            // One Sync for three, the second failing: the third is skipped.
            10 => steps.push(request(
                [
                    unsynced("SELECT 1"),
                    unsynced("SELECT 1/0"),
                    unsynced("SELECT 2"),
                    sync().to_vec(),
                ]
                .concat(),
                1,
            )),
            11 => {
                let end = if rng.random_bool(0.5) {
                    "COMMIT"
                } else {
                    "ROLLBACK"
                };
                for sql in [
                    "BEGIN".to_string(),
                    format!("INSERT INTO {table} VALUES ({n}, 'in a block')"),
                    "SAVEPOINT a".into(),
                    "SELECT 1/0".into(),
                    "ROLLBACK TO a".into(),
                    format!("SELECT count(*) FROM {table}"),
                    end.into(),
                ] {
                    steps.push(request(query(&sql), 1));
                }
            }
            12 => {
                let note = "n".repeat(if rng.random_bool(0.3) { 200_000 } else { 10 });
                let rows = format!("{n}\t{note}\n{}\tsecond\n", n + 1);
                let copy = [
                    query(&format!("COPY {table} FROM STDIN")).to_vec(),
                    copy_data(rows.as_bytes()).to_vec(),
                    copy_done(),
                ];
                steps.push(request(copy.concat(), 1));
            }
            // COPY FROM STDIN through the extended protocol, as tokio-postgres sends it:
            // its first Sync comes before the data, and the server ignores it.
            13 => {
                let copy = [
                    extended("", &format!("COPY {table} FROM STDIN")).to_vec(),
                    copy_data(format!("{n}\textended\n").as_bytes()).to_vec(),
                    copy_done(),
                    sync().to_vec(),
                ];
                steps.push(request(copy.concat(), 1));
            }
            14 => steps.push(request(
                query(&format!(
                    "COPY (SELECT id, left(note, 20) FROM {table} ORDER BY 1, 2) TO STDOUT"
                )),
                1,
            )),
            15 => {
                let size = rng.random_range(50_000..300_000);
                steps.push(request(query(&format!("SELECT repeat('x', {size})")), 1));
            }
            16 => {
                let sql = if rng.random_bool(0.5) {
                    "DISCARD ALL"
                } else {
                    "DEALLOCATE ALL"
                };
                steps.push(request(query(sql), 1));
            }
            // Tagged with the table, so that the run can see it running on the server.
            17 => steps.push(Step::Cancelled {
                bytes: query(&format!("SELECT pg_sleep(30) /* {table} */")).to_vec(),
            }),
            18 if rng.random_bool(0.3) => {
                // Leave: mid-transaction or not, with a Terminate, half a message or nothing.
                if rng.random_bool(0.5) {
                    steps.push(request(query("BEGIN"), 1));
                }
                let bytes = match rng.random_range(0..3) {
                    0 => terminate().to_vec(),
                    1 => query("SELECT 1").to_vec()[..rng.random_range(1..9)].to_vec(),
                    _ => Vec::new(),
                };
                steps.push(Step::Leave { bytes });
                return steps;
            }
            _ => steps.push(request(extended("", &format!("SELECT {n}, 'text'")), 1)),
        }
    }
    steps
}

/// The messages of `steps`, a line per step, for a failure's message.
fn describe(steps: &[Step]) -> String {
    let line = |bytes: &[u8]| {
        let mut out = Vec::new();
        let mut rest = bytes;
        while rest.len() >= 5 {
            let len =
                (u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize + 1).min(rest.len());
            let text: String = String::from_utf8_lossy(&rest[5..len])
                .chars()
                .filter(|c| !c.is_control())
                .take(60)
                .collect();
            out.push(format!("{}[{text}]", rest[0] as char));
            rest = &rest[len..];
        }
        out.join(" ")
    };
    steps
        .iter()
        .enumerate()
        .map(|(i, s)| match s {
            Step::Request { bytes, .. } => format!("{i}: {}", line(bytes)),
            Step::Cancelled { bytes } => format!("{i}: cancelled {}", line(bytes)),
            Step::Leave { bytes } => format!("{i}: leave {bytes:?}"),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What is compared of a message: its tag and what it means, not what differs between a
/// direct and a proxied run (parameters, notices, key data, table OIDs).
fn normalized(m: &Msg) -> Option<String> {
    Some(match m.tag {
        b'S' | b'N' | b'K' => return None,
        b'E' => format!("E {}", m.field(b'C').unwrap_or_default()),
        // Field count only: table OIDs differ between the two runs' tables.
        b'T' => format!("T {}", u16::from_be_bytes([m.body[0], m.body[1]])),
        b'D' | b'C' | b'Z' | b'd' => {
            format!("{} {}", m.tag as char, String::from_utf8_lossy(&m.body))
        }
        t => (t as char).to_string(),
    })
}

/// Writes `bytes` in random pieces with random short pauses.
async fn send_split(c: &mut RawClient, bytes: &[u8], rng: &mut StdRng, context: &str) {
    use tokio::io::AsyncWriteExt;
    let mut rest = bytes;
    while !rest.is_empty() {
        let most = rng.random_range(1..4096);
        let n = rng.random_range(1..=rest.len().min(most));
        if let Err(e) = c.stream.write_all(&rest[..n]).await {
            let said = c.until_closed().await;
            panic!(
                "{context}: write failed ({e}); the peer said {}",
                show(&said)
            );
        }
        rest = &rest[n..];
        if rng.random_bool(0.2) {
            tokio::time::sleep(Duration::from_micros(rng.random_range(0..2000))).await;
        }
    }
}

/// What a run of a script saw: the normalized answers of each step, and the longest any
/// step took from its first byte sent to its last answer.
struct Seen {
    transcript: Vec<Vec<String>>,
    longest_step: Duration,
}

/// Runs a script on `port`; `who` names the run in failure messages.
async fn run(
    port: u16,
    steps: &[Step],
    split_seed: u64,
    who: &str,
    direct: &tokio_postgres::Client,
) -> Seen {
    let mut rng = StdRng::seed_from_u64(split_seed);
    let (mut c, login) = RawClient::login(port, SUPERUSER, "app").await;
    let key = RawClient::key(&login);
    let mut transcript = Vec::new();
    let mut longest_step = Duration::ZERO;
    // Bytes of the next request already sent along with the previous one.
    let mut sent_ahead = 0;
    for (i, step) in steps.iter().enumerate() {
        let started = std::time::Instant::now();
        let bytes = match step {
            Step::Request { bytes, .. } | Step::Cancelled { bytes } => bytes,
            Step::Leave { bytes } => {
                // The peer may close at a Terminate's first byte: what fails to go out
                // after it does not matter.
                use tokio::io::AsyncWriteExt;
                let _ = c.stream.write_all(&bytes[sent_ahead..]).await;
                return Seen {
                    transcript,
                    longest_step,
                };
            }
        };
        let context = format!("{who} on port {port}, step {i}");
        send_split(&mut c, &bytes[sent_ahead..], &mut rng, &context).await;
        sent_ahead = 0;
        let mut answers = Vec::new();
        if let Step::Request { readies, .. } = step {
            // Sometimes the start of the next request goes out before these answers.
            if let Some(Step::Request { bytes: next, .. }) = steps.get(i + 1) {
                if rng.random_bool(0.25) {
                    sent_ahead = rng.random_range(1..=next.len().min(16));
                    c.send(&next[..sent_ahead]).await;
                }
            }
            for _ in 0..*readies {
                answers.extend(c.until_ready().await);
            }
        } else {
            // A cancelled query: one cancel, once it runs. A cancel sent before would find
            // nothing to cancel, and one sent again might reach the client's next query.
            let text = String::from_utf8_lossy(&bytes[5..bytes.len() - 1]).into_owned();
            let deadline = std::time::Instant::now() + PATIENCE;
            loop {
                let rows = direct
                    .query(
                        "SELECT coalesce(state, '') || ' ' || query FROM pg_stat_activity \
                         WHERE datname = 'app' AND pid <> pg_backend_pid()",
                        &[],
                    )
                    .await
                    .unwrap();
                let rows: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                if rows.iter().any(|r| *r == format!("active {text}")) {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{context}: never ran; the server has {rows:#?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            RawClient::cancel(port, key).await;
            // The RowDescription comes or not, as the cancel was early or late.
            answers.extend(c.until_ready().await.into_iter().filter(|m| m.tag != b'T'));
        }
        transcript.push(answers.iter().filter_map(normalized).collect());
        longest_step = longest_step.max(started.elapsed());
    }
    Seen {
        transcript,
        longest_step,
    }
}

/// How much longer than the longest step on a direct connection a proxied step may take:
/// queueing for one of the pool's connections behind other clients' short transactions,
/// on a busy machine. A released connection left unused while a client waits (a lost
/// wake-up, a missed hand-off) shows as a step that waits far longer.
const WAIT_ALLOWANCE: Duration = Duration::from_secs(15);

/// Server connections of database `app` (other than `direct`'s own) working or inside a
/// transaction.
async fn busy_server_connections(direct: &tokio_postgres::Client) -> i64 {
    direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' \
             AND pid <> pg_backend_pid() AND state IS DISTINCT FROM 'idle'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_scripts_answer_as_direct_ones() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    // PGVANE_ORACLE_FIRST_SEED re-runs a failing seed on its own.
    let first = env("PGVANE_ORACLE_FIRST_SEED", 0);
    let seeds = first..first + env("PGVANE_ORACLE_SEEDS", 6);
    let cluster = Cluster::start(0);
    create_app_db(&cluster).await;
    let direct_port = cluster.primary().port;
    let (session, tx) = (free_port(), free_port());
    let listeners = listener("session", session, "primary", "mode = \"session\"")
        + &listener("tx", tx, "primary", "mode = \"transaction\"");
    let extra = format!("[pool]\ndefault_pool_size = {POOL}\n");
    let _pgvane = Pgvane::start(&pooled_config(&cluster, &listeners, &extra), &[session, tx]);
    let direct = connect(direct_port, SUPERUSER, "app").await.unwrap();
    if std::env::var_os("PGVANE_ORACLE_LOG_STATEMENTS").is_some() {
        for sql in [
            "ALTER SYSTEM SET log_statement = 'all'",
            "ALTER SYSTEM SET log_line_prefix = '%m [%p] '",
            "SELECT pg_reload_conf()",
        ] {
            direct.simple_query(sql).await.unwrap();
        }
    }

    let mut operations = 0;
    for seed in seeds.clone() {
        let tables: Vec<_> = (0..CLIENTS)
            .flat_map(|c| [format!("direct_{seed}_{c}"), format!("proxied_{seed}_{c}")])
            .collect();
        for t in &tables {
            direct
                .batch_execute(&format!("CREATE TABLE {t} (id int, note text)"))
                .await
                .unwrap();
        }
        let direct = &direct;
        let clients = (0..CLIENTS).map(|c| async move {
            let port = if c < SESSION_CLIENTS { session } else { tx };
            let expected = run(
                direct_port,
                &script(seed, c, &format!("direct_{seed}_{c}")),
                seed ^ c as u64,
                &format!("seed {seed}, client {c}"),
                direct,
            )
            .await;
            let proxied_script = script(seed, c, &format!("proxied_{seed}_{c}"));
            let got = run(
                port,
                &proxied_script,
                !(seed ^ c as u64),
                &format!("seed {seed}, client {c}"),
                direct,
            )
            .await;
            assert!(
                got.longest_step < expected.longest_step + WAIT_ALLOWANCE,
                "seed {seed}, client {c}: a step took {:?} through pgvane, at most {:?} directly",
                got.longest_step,
                expected.longest_step
            );
            let (expected, got) = (expected.transcript, got.transcript);
            for (i, (want, got)) in expected.iter().zip(&got).enumerate() {
                assert_eq!(
                    got,
                    want,
                    "seed {seed}, client {c}, step {i}; the script up to it:\n{}",
                    describe(&proxied_script[..=i])
                );
            }
            assert_eq!(got.len(), expected.len(), "seed {seed}, client {c}");
            proxied_script.len()
        });
        use futures_util::FutureExt;
        match std::panic::AssertUnwindSafe(join_all(clients))
            .catch_unwind()
            .await
        {
            Ok(done) => operations += done.into_iter().sum::<usize>(),
            Err(panic) => {
                eprintln!("---- server log ----\n{}", cluster.primary().log());
                std::panic::resume_unwind(panic);
            }
        }
        eventually(PATIENCE, "no server connection left busy", || async {
            (busy_server_connections(direct).await == 0).then_some(())
        })
        .await;
    }
    eprintln!("oracle: seeds {seeds:?}, {operations} proxied operations, all as direct");
}
