//! Debian's PgBouncer, started by a test as the unprivileged user, for differential tests.

use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

use super::{free_port, hand_over, run_as, wait_listening};

pub struct Bouncer {
    child: Child,
    pub port: u16,
    dir: TempDir,
}

impl Bouncer {
    /// Starts `pgbouncer` with `[databases]` and `[pgbouncer]` settings (listen address,
    /// port, log and socket settings are added) and waits until it listens.
    pub fn start(databases: &str, settings: &str, auth_file: &str) -> Bouncer {
        let dir = tempfile::Builder::new()
            .prefix("pgvane-bouncer-")
            .tempdir()
            .unwrap();
        hand_over(dir.path());
        let port = free_port();
        let auth = dir.path().join("userlist.txt");
        std::fs::write(&auth, auth_file).unwrap();
        let ini = dir.path().join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n{databases}\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                 unix_socket_dir =\nauth_file = {}\nlogfile = {}\n{settings}\n",
                auth.display(),
                dir.path().join("pgbouncer.log").display()
            ),
        )
        .unwrap();
        for f in [&auth, &ini] {
            hand_over(f);
        }
        let mut cmd = Command::new("pgbouncer");
        cmd.arg(&ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(r) = run_as() {
            use std::os::unix::process::CommandExt;
            cmd.uid(r.uid).gid(r.gid);
        }
        let child = cmd
            .spawn()
            .expect("start pgbouncer (Debian's package `pgbouncer`; scripts/test installs it)");
        let mut b = Bouncer { child, port, dir };
        let log = b.dir.path().join("pgbouncer.log");
        wait_listening(&mut b.child, "pgbouncer", &[port], &log);
        b
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
