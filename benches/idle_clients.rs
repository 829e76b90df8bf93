//! Opens N client connections to a PostgreSQL-speaking port, logs each one in, then keeps
//! them all idle for HOLD_SECONDS: the load half of `benches/idle_rss.sh`, which reads the
//! proxy's memory. Then each client queries again over its connection, and the count that
//! could not is printed (`benches/upgrade.sh` upgrades pgvane meanwhile).
//!
//! cargo bench --bench idle_clients -- PORT COUNT USER PASSWORD DBNAME HOLD_SECONDS

use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use tokio_postgres::NoTls;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [port, count, user, password, dbname, hold] = &args[..] else {
        eprintln!("usage: idle_clients PORT COUNT USER PASSWORD DBNAME HOLD_SECONDS");
        std::process::exit(2);
    };
    let (port, count, hold): (u16, usize, u64) = (
        port.parse().expect("port"),
        count.parse().expect("count"),
        hold.parse().expect("seconds"),
    );
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname(dbname)
        .connect_timeout(Duration::from_secs(30));
    let clients: Vec<_> = stream::iter(0..count)
        .map(|_| {
            let config = config.clone();
            async move {
                let (client, conn) = config.connect(NoTls).await.expect("connect");
                tokio::spawn(conn);
                client.simple_query("SELECT 1").await.expect("query");
                client
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    println!("connected {}", clients.len());
    tokio::time::sleep(Duration::from_secs(hold)).await;
    let failed = stream::iter(&clients)
        .map(|c| async move { c.simple_query("SELECT 1").await.is_err() })
        .buffer_unordered(64)
        .filter(|failed| std::future::ready(*failed))
        .count()
        .await;
    println!("queried again {} failed {failed}", clients.len());
}
