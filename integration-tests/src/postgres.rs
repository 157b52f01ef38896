//! A PostgreSQL server of a test's own: `initdb` and `pg_ctl` (PostgreSQL
//! 15, Debian's `postgresql-15`, which `.ci/run` installs where missing) in
//! a temporary directory, listening on a loopback port only, stopped
//! (immediately) when dropped. Run as root, the server runs as the
//! `postgres` user, as `initdb` requires.
//!
//! Tests stop and start it again ([`TestPostgres::stop`],
//! [`TestPostgres::start_again`]) to see what replicas do without their
//! database.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

/// One throw-away PostgreSQL server.
#[derive(Debug)]
pub struct TestPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// The user the server runs as, where this process is root.
    run_as: Option<String>,
}

impl TestPostgres {
    /// Creates a cluster in a temporary directory and starts it on a free
    /// loopback port (blocking: call it before or beside the runtime).
    pub fn start() -> anyhow::Result<Self> {
        let bin = find_bin()?;
        let dir = tempfile::Builder::new().prefix("onceonly-pg-").tempdir()?;
        let root = is_root();
        let run_as = root.then(|| "postgres".to_owned());
        if root {
            let uid = user_id("postgres")?;
            std::os::unix::fs::chown(dir.path(), Some(uid), None)
                .with_context(|| format!("chown {} to postgres", dir.path().display()))?;
        }
        let server = TestPostgres {
            dir,
            bin,
            port: 0,
            run_as,
        };
        server.run(
            "initdb",
            &[
                "-D",
                &server.data().display().to_string(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-instructions",
                "--no-sync",
            ],
        )?;
        let mut server = server;
        let mut last = None;
        // A free port is bound, read and released, so another process may
        // take it before the server does: try a few.
        for _ in 0..5 {
            server.port = crate::free_port()?;
            match server.start_again() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("PostgreSQL did not start")))
    }

    /// The connection URL of `database` (user `postgres`, no password:
    /// trust on loopback).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (fast shutdown: sessions are ended).
    pub fn stop(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["-m", "fast", "-w", "stop"])
    }

    /// Starts the (stopped) server again on the same port.
    pub fn start_again(&self) -> anyhow::Result<()> {
        // ONCEONLY_PG_OPTIONS adds server options, e.g. for a profile of
        // the bench's statements: "-c shared_preload_libraries=pg_stat_statements".
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={} {}",
            self.port,
            self.dir.path().display(),
            std::env::var("ONCEONLY_PG_OPTIONS").unwrap_or_default()
        );
        self.pg_ctl(&[
            "-l",
            &self.dir.path().join("server.log").display().to_string(),
            "-o",
            &options,
            "-w",
            "-t",
            "30",
            "start",
        ])
    }

    /// Turns TLS on (for the next start): a throw-away CA and a server
    /// certificate for 127.0.0.1 and localhost, written into the data
    /// directory; and, with `only_tls`, refuses plaintext connections over
    /// TCP. Returns the CA's certificate (PEM) for clients. Restarts the
    /// server.
    pub fn enable_tls(&self, only_tls: bool) -> anyhow::Result<String> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "onceonly test PostgreSQL CA");
        let ca = ca_params.self_signed(&ca_key)?;
        let server_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "onceonly test PostgreSQL");
        let server = params.signed_by(&server_key, &Issuer::new(ca_params, &ca_key))?;
        let data = self.data();
        std::fs::write(data.join("server.crt"), server.pem())?;
        std::fs::write(data.join("server.key"), server_key.serialize_pem())?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                data.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )?;
        }
        if self.run_as.is_some() {
            let uid = user_id("postgres")?;
            for file in ["server.crt", "server.key"] {
                std::os::unix::fs::chown(data.join(file), Some(uid), None)?;
            }
        }
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf"))?;
        conf.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_min_protocol_version = 'TLSv1.3'\n");
        std::fs::write(data.join("postgresql.conf"), conf)?;
        if only_tls {
            let hba = "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n";
            std::fs::write(data.join("pg_hba.conf"), hba)?;
        }
        self.stop()?;
        self.start_again()?;
        Ok(ca.pem())
    }

    /// The server's log so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `pg_ctl` on this server's data directory.
    fn pg_ctl(&self, args: &[&str]) -> anyhow::Result<()> {
        let data = self.data().display().to_string();
        let mut all = vec!["-D", data.as_str()];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all)
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let path = self.bin.join(program);
        let mut command = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&path);
                c
            }
            None => Command::new(&path),
        };
        let output = command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .with_context(|| format!("running {}", path.display()))?;
        if !output.status.success() {
            bail!(
                "{} {} failed: {}{}\n{}",
                path.display(),
                args.join(" "),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.log()
            );
        }
        Ok(())
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }
}

/// PostgreSQL's server programs: `ONCEONLY_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin` (Debian's layout), else `initdb` on PATH.
fn find_bin() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("ONCEONLY_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .find(|dir| dir.join("initdb").exists());
    on_path.ok_or_else(|| {
        anyhow::anyhow!(
            "no PostgreSQL server programs (initdb, pg_ctl): install Debian's postgresql-15 (`.ci/run` does), or set ONCEONLY_PG_BIN to their directory"
        )
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn user_id(user: &str) -> anyhow::Result<u32> {
    let output = Command::new("id").args(["-u", user]).output()?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .with_context(|| format!("no user {user}: PostgreSQL will not run as root"))
}
