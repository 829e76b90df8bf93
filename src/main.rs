//! The `pgvane` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use pgvane::config::{Config, WorkerThreads};
use tracing_subscriber::EnvFilter;

/// Health-aware PostgreSQL proxy for replicated clusters.
#[derive(Parser)]
#[command(version = pgvane::VERSION, about)]
struct Cli {
    /// Path of the TOML configuration file.
    #[arg(long, short, global = true, default_value = "/etc/pgvane/pgvane.toml")]
    config: PathBuf,
    /// Log output format. The level comes from RUST_LOG (default: info).
    #[arg(long, value_enum, global = true, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and print it with every default filled in.
    Check,
    /// Print a pgvane.toml equivalent to a pgbouncer.ini and/or a Patroni-style
    /// haproxy.cfg, listing every setting that could not be carried over.
    Import {
        /// A pgbouncer.ini (its auth_file is referred to, not copied).
        #[arg(long)]
        pgbouncer: Option<PathBuf>,
        /// An haproxy.cfg with Patroni's HTTP checks.
        #[arg(long)]
        haproxy: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Import { pgbouncer, haproxy }) = &cli.command {
        if pgbouncer.is_none() && haproxy.is_none() {
            eprintln!("pgvane import: name a file: --pgbouncer pgbouncer.ini and/or --haproxy haproxy.cfg");
            return ExitCode::from(2);
        }
        return match pgvane::import::import(pgbouncer.as_deref(), haproxy.as_deref()) {
            Ok(import) => {
                print!("{}", import.to_toml());
                eprintln!(
                    "pgvane import: {} setting(s) not carried over (listed at the top)",
                    import.skipped.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pgvane import: {e}");
                ExitCode::from(2)
            }
        };
    }
    let loaded = Config::load(&cli.config).and_then(|c| {
        let referenced = pgvane::server::load_referenced(&c)?;
        Ok((c, referenced))
    });
    let (config, referenced) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("pgvane: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Check) = &cli.command {
        print!("{}", config.to_resolved_toml());
        for warning in pgvane::tls::expiring_soon(&referenced.tls) {
            eprintln!("pgvane: warning: {warning}");
        }
        eprintln!("pgvane: {} is valid", cli.config.display());
        return ExitCode::SUCCESS;
    }

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colors only on a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match cli.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }

    let runtime = match runtime(config.general.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgvane: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(pgvane::server::run(cli.config.clone(), config, referenced)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// One thread runs everything on the main thread (no work stealing, no wake-ups across
/// threads); more get tokio's work-stealing scheduler. The names tell the threads apart in
/// `top -H`: with one thread, only the blocking pool (server logins' key derivation) has
/// threads of its own.
fn runtime(threads: WorkerThreads) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        WorkerThreads::Count(n) if n.get() == 1 => {
            let mut b = tokio::runtime::Builder::new_current_thread();
            b.thread_name("pgvane-blocking");
            b
        }
        _ => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.thread_name("pgvane-worker");
            if let WorkerThreads::Count(n) = threads {
                b.worker_threads(n.get());
            }
            b
        }
    };
    builder.enable_all().build()
}

/// mimalloc rather than glibc's malloc: a pooler allocates and frees the same few sizes per
/// transaction from every session, which glibc's per-thread cache (seven chunks per size)
/// overflows into its locked arena. Measured against glibc with one worker thread: 1-3 us
/// less CPU per `-S` transaction in each of 4 interleaved runs; about the same memory per
/// idle client, and a few MiB more at start.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
