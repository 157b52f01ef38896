//! An installation laid out as OPERATIONS.md describes it, under a
//! temporary root, run from the binaries of this build as the shipped
//! systemd units start them: the command lines are read from the unit files
//! in `deploy/` (`ExecStartPre=`, `ExecStart=`), with `/usr/local/bin` and
//! `/etc/onceonly` moved under the root. The PKI is made with the
//! `onceonly-certs` binary, as an operator makes it; configuration files
//! start from the shipped samples.
//!
//! In-process tests start the broker as a library and stop it through a
//! handle; they once hid a broker that never exited on SIGTERM. These
//! helpers are for tests of what ships: processes, files, signals.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use onceonly_certs::{Participant, Pki, Role};
use tonic::transport::Channel;

use crate::binary;

/// The command line of `key` (`ExecStart`, `ExecStartPre`) in the shipped
/// unit `unit` (e.g. `onceonly-broker.service`), with the template's
/// instance `%i`, binaries from this build and `/etc/onceonly` at `etc`.
pub fn unit_command(unit: &str, key: &str, instance: &str, etc: &Path) -> Command {
    let path = repository().join("deploy").join(unit);
    let text = std::fs::read_to_string(&path).expect("the unit file");
    let prefix = format!("{key}=");
    let line = text
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{} has no {key}=", path.display()));
    let etc = format!("{}/", etc.display());
    let mut words = line
        .split_whitespace()
        .map(|word| word.replace("%i", instance).replace("/etc/onceonly/", &etc));
    let program = words.next().expect("a program");
    let name = program
        .strip_prefix("/usr/local/bin/")
        .unwrap_or_else(|| panic!("{key} of {unit} runs {program}, not an installed binary"));
    let mut command = Command::new(binary(name, name));
    command.args(words);
    command
}

/// The repository's root (for `deploy/` and the sample configurations).
pub fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository")
        .to_owned()
}

/// The connectors of the sample routing table: (register, connector id,
/// port in the samples).
pub const REGISTERS: [(&str, &str, u16); 3] = [
    ("civil", "civil-register", 7101),
    ("vehicle", "vehicle-register", 7102),
    ("business", "business-register", 7103),
];

/// What a test changes in the shipped samples.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The broker's `shutdown_announce`.
    pub shutdown_announce: Duration,
    /// The broker's `shutdown_grace`.
    pub shutdown_grace: Duration,
    /// The civil register's answer latency (`[faults] latency`).
    pub civil_latency: Duration,
    /// Where broker and connectors export spans, if anywhere.
    pub otlp_endpoint: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            shutdown_announce: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(3),
            civil_latency: Duration::ZERO,
            otlp_endpoint: None,
        }
    }
}

/// An installation under a temporary root: `etc/onceonly/` (configuration
/// and `tls/`), `var/lib/onceonly/` (`secrets/`, `data/`), and `pki/` (the
/// CA's machine, here the same one).
pub struct Installation {
    /// The root (removed on drop).
    pub root: tempfile::TempDir,
    /// The PKI the operator made.
    pub pki: Pki,
    settings: Settings,
}

impl Installation {
    /// Makes the PKI with `onceonly-certs` and writes the connectors'
    /// configurations; the broker's is written by [`Self::configure_broker`]
    /// once the connectors' addresses are known.
    pub fn lay_out(settings: Settings) -> Installation {
        let root = tempfile::Builder::new()
            .prefix("onceonly-deployed-")
            .tempdir()
            .expect("temp root");
        let pki_dir = root.path().join("pki");
        let certs = |args: &[&str]| {
            let output = Command::new(binary("onceonly-certs", "onceonly-certs"))
                .arg("--dir")
                .arg(&pki_dir)
                .args(args)
                .output()
                .expect("onceonly-certs runs");
            assert!(
                output.status.success(),
                "onceonly-certs {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        certs(&["init", "--trust-domain", "onceonly.test"]);
        for (_, id, _) in REGISTERS {
            certs(&["issue", "--role", "connector", "--id", id]);
        }
        for id in ["elterngeld-berlin", "elterngeld-muenchen"] {
            certs(&["issue", "--role", "authority", "--id", id]);
        }
        certs(&["issue", "--role", "auditor", "--id", "datenschutz"]);
        let pki = Pki::open(&pki_dir).expect("the PKI");
        let installation = Installation {
            root,
            pki,
            settings,
        };
        let tls = installation.etc().join("tls");
        std::fs::create_dir_all(&tls).expect("etc/onceonly/tls");
        installation.publish_crl();
        for (from, to) in [
            ("ca.pem", "ca.pem"),
            ("broker/broker.pem", "broker.pem"),
            ("broker/broker.key", "broker.key"),
        ] {
            std::fs::copy(pki_dir.join(from), tls.join(to)).expect("copy TLS files");
        }
        for (register, _, _) in REGISTERS {
            installation.write_connector_config(register);
        }
        installation
    }

    /// `etc/onceonly` under the root.
    pub fn etc(&self) -> PathBuf {
        self.root.path().join("etc/onceonly")
    }

    /// `var/lib/onceonly` under the root.
    pub fn state(&self) -> PathBuf {
        self.root.path().join("var/lib/onceonly")
    }

    /// The broker's configuration file.
    pub fn broker_config(&self) -> PathBuf {
        self.etc().join("broker.toml")
    }

    /// Copies the CA's current `crl.pem` to the broker's `tls/`, as the
    /// operator distributes it.
    pub fn publish_crl(&self) {
        std::fs::copy(self.pki.crl_path(), self.etc().join("tls/crl.pem")).expect("copy the CRL");
    }

    fn write_connector_config(&self, register: &str) {
        let sample = repository().join(format!("registry-mock/config/{register}.toml"));
        let text = std::fs::read_to_string(&sample).expect("the sample connector config");
        let pki = self.root.path().join("pki");
        let mut connector_lines = "admin_listen = \"127.0.0.1:0\"\n".to_owned();
        if let Some(endpoint) = &self.settings.otlp_endpoint {
            connector_lines.push_str(&format!("otlp_endpoint = \"{endpoint}\"\n"));
        }
        let latency = if register == "civil" {
            self.settings.civil_latency
        } else {
            Duration::ZERO
        };
        let text = replace_all(
            &sample,
            &text,
            &[
                (
                    &format!("listen = \"127.0.0.1:{}\"", port_of(register)),
                    "listen = \"127.0.0.1:0\"".to_owned(),
                ),
                ("\"../../pki/", format!("\"{}/", pki.display())),
                (
                    "allowed_broker_id = \"broker\"\n",
                    format!("allowed_broker_id = \"broker\"\n{connector_lines}"),
                ),
                (
                    "latency = \"0ms\"",
                    format!("latency = \"{}ms\"", latency.as_millis()),
                ),
            ],
        );
        let dir = self.etc().join("connectors");
        std::fs::create_dir_all(&dir).expect("etc/onceonly/connectors");
        std::fs::write(dir.join(format!("{register}.toml")), text).expect("connector config");
    }

    /// Writes `broker.toml` (from the shipped sample, in the layout of
    /// OPERATIONS.md §1), `policy.toml` and `routing.toml` (the samples,
    /// the connectors at `connectors`).
    pub fn configure_broker(&self, connectors: &[(&str, SocketAddr)]) {
        let samples = repository().join("broker/config");
        let sample = samples.join("broker.toml");
        let text = std::fs::read_to_string(&sample).expect("the sample broker.toml");
        let state = self.state();
        let mut telemetry = String::new();
        if let Some(endpoint) = &self.settings.otlp_endpoint {
            telemetry = format!("otlp_endpoint = \"{endpoint}\"\n");
        }
        let text = replace_all(
            &sample,
            &text,
            &[
                (
                    "listen = \"127.0.0.1:7443\"",
                    "listen = \"127.0.0.1:0\"".into(),
                ),
                (
                    "data_dir = \"../../demo-data/broker\"",
                    format!("data_dir = \"{}/data\"", state.display()),
                ),
                (
                    "\"../../demo-data/secrets/",
                    format!("\"{}/secrets/", state.display()),
                ),
                ("\"../../pki/ca.pem\"", "\"tls/ca.pem\"".into()),
                (
                    "\"../../pki/broker/broker.pem\"",
                    "\"tls/broker.pem\"".into(),
                ),
                (
                    "\"../../pki/broker/broker.key\"",
                    "\"tls/broker.key\"".into(),
                ),
                ("\"../../pki/crl.pem\"", "\"tls/crl.pem\"".into()),
                (
                    "shutdown_announce = \"5s\"",
                    format!(
                        "shutdown_announce = \"{}ms\"\nshutdown_grace = \"{}ms\"",
                        self.settings.shutdown_announce.as_millis(),
                        self.settings.shutdown_grace.as_millis()
                    ),
                ),
                (
                    "listen = \"127.0.0.1:9464\"",
                    "listen = \"127.0.0.1:0\"".into(),
                ),
                (
                    "listen = \"127.0.0.1:8443\"",
                    "listen = \"127.0.0.1:0\"".into(),
                ),
                ("[telemetry]\n", format!("[telemetry]\n{telemetry}")),
            ],
        );
        std::fs::write(self.broker_config(), text).expect("broker.toml");
        std::fs::copy(samples.join("policy.toml"), self.etc().join("policy.toml"))
            .expect("policy.toml");
        let routing_sample = samples.join("routing.toml");
        let mut routing = std::fs::read_to_string(&routing_sample).expect("routing.toml");
        for (register, addr) in connectors {
            let sample_endpoint = format!("127.0.0.1:{}", port_of(register));
            routing = replace_all(
                &routing_sample,
                &routing,
                &[(&sample_endpoint, addr.to_string())],
            );
        }
        std::fs::write(self.etc().join("routing.toml"), routing).expect("routing.toml");
    }

    /// The command line of `key` (`ExecStart`, `ExecStartPre`) in the
    /// shipped unit `unit`, `/etc/onceonly` under the root (see
    /// [`unit_command`]).
    pub fn unit_command(&self, unit: &str, key: &str, instance: &str) -> Command {
        unit_command(unit, key, instance, &self.etc())
    }

    /// Starts `ExecStart` of `unit` as a process; stdout is scanned for
    /// the line that names its address (`... on 127.0.0.1:PORT`); stdout
    /// and stderr (the logs) go to a file under the root.
    pub fn start(&self, unit: &str, instance: &str) -> Process {
        let log = self.root.path().join(format!("{instance}.log"));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut child = self
            .unit_command(unit, "ExecStart", instance)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("the process starts");
        let stdout = child.stdout.take().expect("stdout");
        let (found, address) = std::sync::mpsc::channel();
        let mut copy = std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .expect("log file");
        // Reads stdout (where the logs go too, as under systemd's journal)
        // to its end, so the process never blocks on a full pipe.
        std::thread::spawn(move || {
            use std::io::Write;
            let mut found = Some(found);
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(copy, "{line}");
                if let Some(addr) = line
                    .rsplit(" on ")
                    .next()
                    .and_then(|a| a.trim().parse::<SocketAddr>().ok())
                    && let Some(found) = found.take()
                {
                    let _ = found.send(addr);
                }
            }
        });
        let mut process = Process {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        match address.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => process.addr = addr,
            Err(_) => panic!(
                "{instance} printed no address; its log:\n{}",
                process.logs()
            ),
        }
        process
    }

    /// `onceonly-broker init` on the broker's configuration, as the
    /// operator runs it once; its output where it fails.
    pub fn init_broker(&self) -> Result<(), String> {
        let init = Command::new(binary("onceonly-broker", "onceonly-broker"))
            .arg("init")
            .arg("--config")
            .arg(self.broker_config())
            .output()
            .expect("init runs");
        if init.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&init.stderr).into_owned())
        }
    }

    /// Runs `ExecStartPre` of `unit` (the broker's `check`) to its end.
    pub fn run_start_pre(&self, unit: &str) -> std::process::Output {
        self.unit_command(unit, "ExecStartPre", "")
            .output()
            .expect("ExecStartPre runs")
    }

    /// A channel to `addr` as participant (`role`, `id`), expecting the
    /// broker.
    pub fn channel(&self, addr: SocketAddr, role: Role, id: &str) -> Channel {
        let broker: Participant = self
            .pki
            .participant(Role::Broker, "broker")
            .expect("the broker");
        crate::channel_as(&self.pki, role, id, addr, Some(broker))
    }
}

/// A process started from a unit's command line.
pub struct Process {
    child: Child,
    /// The address it printed.
    pub addr: SocketAddr,
    log: PathBuf,
}

impl Process {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`TERM`, `HUP`, ...) with kill(1), as systemd does
    /// with `KillSignal=` and `ExecReload=`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// Waits at most `limit` for the process to exit: its status and how
    /// long it took, or None (still running).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<(ExitStatus, Duration)> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some((status, started.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// What it logged so far (stdout and stderr).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The admin listener's address, from the line the process logged
    /// (`... metrics on http://ADDR/metrics ...`), waiting at most 30 s.
    pub fn admin_addr(&self) -> SocketAddr {
        let started = Instant::now();
        loop {
            let logs = self.logs();
            // The last start's line: a restarted process appends to the
            // same log.
            if let Some(addr) = logs
                .rsplit_once("metrics on http://")
                .and_then(|(_, rest)| rest.split('/').next())
                .and_then(|addr| addr.parse().ok())
            {
                return addr;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no admin listener logged:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A failing test must not leave processes running.
impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn port_of(register: &str) -> u16 {
    REGISTERS
        .iter()
        .find(|(name, _, _)| *name == register)
        .map(|(_, _, port)| *port)
        .unwrap_or_else(|| panic!("no sample register {register}"))
}

/// `text` with every `(from, to)` replaced; a `from` the text does not hold
/// fails, naming the file: the sample changed under the test.
fn replace_all(file: &Path, text: &str, replacements: &[(&str, String)]) -> String {
    let mut text = text.to_owned();
    for (from, to) in replacements {
        assert!(
            text.contains(from),
            "{} no longer holds {from:?}: adapt the test to the sample",
            file.display()
        );
        text = text.replace(from, to);
    }
    text
}
