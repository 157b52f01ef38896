//! A whole onceonly installation on loopback for tests and the demo: a
//! throw-away PKI, the three mock registers and the school register (the
//! generic connector over SQLite), and the broker, configured
//! from the sample files shipped in `broker/config/` with the registers'
//! real ports filled in.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use onceonly_broker::{BoundBroker, BrokerConfig, RunningBroker};
use onceonly_certs::pki::ThrowawayPki;
use onceonly_certs::{Pki, Role};
use onceonly_connector_sdk::RunningConnector;
use onceonly_proto::v1::AuditRecord;
use onceonly_proto::v1::audit_service_client::AuditServiceClient;
use onceonly_proto::v1::consent_service_client::ConsentServiceClient;
use onceonly_proto::v1::evidence_service_client::EvidenceServiceClient;
use onceonly_registry_mock::{MockRegister, RegisterKind};
use tonic::transport::Channel;

use crate::{AuthorityClient, channel_as, start_connector};

/// The shipped sample policy.
pub const SAMPLE_POLICY: &str = include_str!("../../broker/config/policy.toml");
/// The shipped sample routing table (endpoints 127.0.0.1:7101..7103).
pub const SAMPLE_ROUTING: &str = include_str!("../../broker/config/routing.toml");

/// The authorities the sample policy names.
pub const AUTHORITIES: [&str; 5] = [
    "elterngeld-berlin",
    "elterngeld-muenchen",
    "kfz-steuer-koeln",
    "gewerbeamt-muenchen",
    crate::school::BAFOEG,
];
/// Anna Lena Schneider's IDNr, in the shipped civil register (Berlin).
pub const ANNA: &str = "82281866209";

/// Anna, as a subject.
pub fn anna() -> onceonly_proto::v1::SubjectId {
    onceonly_proto::v1::SubjectId {
        scheme: onceonly_proto::v1::SubjectIdScheme::DeIdnr.into(),
        value: ANNA.into(),
    }
}

/// A request for Anna's birth certificate the sample policy allows the
/// parental allowance offices.
pub fn birth_certificate(request_id: &str) -> onceonly_proto::v1::RequestEvidenceRequest {
    onceonly_proto::v1::RequestEvidenceRequest {
        request_id: request_id.into(),
        evidence_type: "birth-certificate".into(),
        subject: Some(anna()),
        purpose: "parental-allowance".into(),
        legal_basis: "§ 9 Abs. 1 BEEG".into(),
        ..Default::default()
    }
}

/// The citizen portal's id.
pub const PORTAL: &str = "buergerportal";
/// The auditor's id.
pub const AUDITOR: &str = "datenschutz";
/// Policy staff's id (role policy-admin).
pub const POLICY_ADMIN: &str = "referat-recht";

/// A running installation.
pub struct World {
    /// The PKI (removed on drop).
    pub pki: ThrowawayPki,
    /// Configuration and data (removed on drop unless kept).
    pub dir: tempfile::TempDir,
    /// The broker's configuration file.
    pub config_path: PathBuf,
    /// Civil, vehicle, business and school registers.
    pub registers: Vec<RunningConnector>,
    /// The broker, while running.
    pub broker: Option<RunningBroker>,
}

/// A test's additions to the broker's configuration file: `limits` lines
/// go under `[limits]`, `sections` are appended as whole tables (e.g.
/// `"[connections]\nmax_connections_per_address = 50\n"`).
#[derive(Debug, Clone, Default)]
pub struct BrokerSettings {
    /// Lines added under `[limits]`.
    pub limits: String,
    /// Lines added under `[tls]`.
    pub tls: String,
    /// Tables appended to the file.
    pub sections: String,
}

impl World {
    /// PKI, registers, broker; sample policy and routing (pointing at the
    /// registers' real ports). Tests that need another routing table
    /// rewrite `routing.toml` in [`World::dir`] and restart the broker.
    pub async fn start() -> World {
        Self::start_with(BrokerSettings::default()).await
    }

    /// Like [`World::start`], with `settings` added to the broker's
    /// configuration.
    pub async fn start_with(settings: BrokerSettings) -> World {
        let mut participants = vec![
            (Role::Portal, PORTAL),
            (Role::Auditor, AUDITOR),
            (Role::PolicyAdmin, POLICY_ADMIN),
        ];
        participants.extend(AUTHORITIES.iter().map(|a| (Role::Authority, *a)));
        for kind in [
            RegisterKind::Civil,
            RegisterKind::Vehicle,
            RegisterKind::Business,
        ] {
            participants.push((Role::Connector, kind.default_connector_id()));
        }
        participants.push((Role::Connector, crate::school::SCHOOL_REGISTER));
        let pki = crate::pki_with(&participants);
        let mut registers = Vec::new();
        let mut routing_text = SAMPLE_ROUTING.to_owned();
        for (kind, sample_port) in [
            (RegisterKind::Civil, 7101),
            (RegisterKind::Vehicle, 7102),
            (RegisterKind::Business, 7103),
        ] {
            let register = MockRegister::embedded(kind).expect("shipped data");
            let running = start_connector(&pki, kind.default_connector_id(), register).await;
            routing_text = routing_text.replace(
                &format!("127.0.0.1:{sample_port}"),
                &running.local_addr().to_string(),
            );
            registers.push(running);
        }
        let dir = tempfile::Builder::new()
            .prefix("onceonly-world-")
            .tempdir()
            .expect("temp dir");
        // The fourth register: no code, a mapping file over SQLite.
        let school =
            onceonly_connector::GenericConnector::load(&crate::school::lay_out(dir.path()))
                .expect("the shipped school mapping");
        let running = start_connector(&pki, crate::school::SCHOOL_REGISTER, school).await;
        routing_text = routing_text.replace("127.0.0.1:7104", &running.local_addr().to_string());
        registers.push(running);
        std::fs::write(dir.path().join("routing.toml"), routing_text).expect("routing");
        std::fs::write(dir.path().join("policy.toml"), SAMPLE_POLICY).expect("policy");
        let config_path = write_broker_config(dir.path(), &pki, &settings);
        let config = BrokerConfig::load(&config_path).expect("broker config");
        onceonly_broker::keys::init(&config).expect("the broker's keys");
        let mut world = World {
            pki,
            dir,
            config_path,
            registers,
            broker: None,
        };
        world.start_broker().await;
        world
    }

    /// (Re)starts the broker on a free port with the same data directory.
    pub async fn start_broker(&mut self) {
        let config = BrokerConfig::load(&self.config_path).expect("broker config");
        let bound = BoundBroker::bind(&config).await.expect("broker binds");
        self.broker = Some(bound.spawn());
    }

    /// Starts another broker from the same configuration, with the same
    /// keys but its own data directory (`data-<n>`) and configuration file
    /// (`broker-<n>.toml`): a replica, where `[storage]` is PostgreSQL.
    pub async fn start_replica(&self, n: usize) -> RunningBroker {
        let config = BrokerConfig::load(&self.replica_config(n)).expect("replica config");
        BoundBroker::bind(&config)
            .await
            .expect("replica binds")
            .spawn()
    }

    /// Writes replica `n`'s configuration file (`broker-<n>.toml`: the
    /// broker's, with data directory `data-<n>`) and returns its path.
    pub fn replica_config(&self, n: usize) -> PathBuf {
        let text = std::fs::read_to_string(&self.config_path).expect("broker.toml");
        let path = self.dir.path().join(format!("broker-{n}.toml"));
        std::fs::write(
            &path,
            text.replacen(
                "data_dir = \"data\"",
                &format!("data_dir = \"data-{n}\""),
                1,
            ),
        )
        .expect("replica config");
        path
    }

    /// A channel to the broker (or replica) at `addr` as (`role`, `id`).
    pub fn channel_to(&self, addr: SocketAddr, role: Role, id: &str) -> Channel {
        let broker = self.pki.participant(Role::Broker, "broker").expect("id");
        channel_as(&self.pki, role, id, addr, Some(broker))
    }

    /// Stops the broker: drains, flushes and closes its data directory.
    pub async fn stop_broker(&mut self) {
        if let Some(broker) = self.broker.take() {
            tokio::time::timeout(Duration::from_secs(30), broker.shutdown())
                .await
                .expect("broker stops in time")
                .expect("broker stops cleanly");
        }
    }

    /// Puts `replacement` (serving with connector `connector_id`'s
    /// certificate) in the place of the register that serves as
    /// `connector_id`, and restarts the broker so it routes there.
    pub async fn replace_register(&mut self, connector_id: &str, replacement: RunningConnector) {
        let position = self
            .registers
            .iter()
            .position(|r| r.identity().id() == connector_id)
            .expect("a register with that connector id");
        let routing_path = self.dir.path().join("routing.toml");
        let routing = std::fs::read_to_string(&routing_path).expect("routing");
        let old = self.registers[position].local_addr().to_string();
        std::fs::write(
            &routing_path,
            routing.replace(&old, &replacement.local_addr().to_string()),
        )
        .expect("write routing");
        self.registers[position] = replacement;
        self.stop_broker().await;
        self.start_broker().await;
    }

    /// The audit records of `request_id`, waiting (at most `limit`) until
    /// there are at least `count`.
    pub async fn wait_for_records(
        &self,
        request_id: &str,
        count: usize,
        limit: Duration,
    ) -> Vec<AuditRecord> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let records: Vec<AuditRecord> = self
                .audit_records()
                .await
                .into_iter()
                .filter(|r| r.request_id == request_id)
                .collect();
            if records.len() >= count || tokio::time::Instant::now() >= deadline {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the broker has no exchange alive (every record of what
    /// was sent so far is written), at most 30 s.
    pub async fn settle(&self) {
        let Some(broker) = self.running_broker().broker() else {
            return;
        };
        let config = BrokerConfig::load(&self.config_path).expect("broker config");
        let waiting = async {
            while broker.exchange_tasks.available_permits() < config.limits.max_exchanges {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), waiting)
            .await
            .expect("the broker's exchanges never ended");
    }

    /// The console's address (`https://127.0.0.1:<port>`).
    pub fn console_url(&self) -> String {
        let addr = self
            .running_broker()
            .console_addr()
            .expect("the test broker has a console");
        format!("https://{addr}")
    }

    /// The broker's admin listener (metrics).
    pub fn admin_addr(&self) -> SocketAddr {
        self.running_broker()
            .admin_addr()
            .expect("the test broker has an admin listener")
    }

    /// The broker's address.
    pub fn broker_addr(&self) -> SocketAddr {
        self.broker.as_ref().expect("broker running").local_addr()
    }

    /// The broker's running handle.
    pub fn running_broker(&self) -> &RunningBroker {
        self.broker.as_ref().expect("broker running")
    }

    /// The policy file the broker watches.
    pub fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.toml")
    }

    /// A channel to the broker as (`role`, `id`).
    pub fn channel(&self, role: Role, id: &str) -> Channel {
        let broker = self.pki.participant(Role::Broker, "broker").expect("id");
        channel_as(&self.pki, role, id, self.broker_addr(), Some(broker))
    }

    /// An EvidenceService client for authority `id`, signing its requests.
    pub fn authority(&self, id: &str) -> AuthorityClient {
        AuthorityClient::new(&self.pki, id, self.channel(Role::Authority, id))
    }

    /// An EvidenceService client for authority `id` at the broker (or
    /// replica) at `addr`, signing its requests.
    pub fn authority_at(&self, addr: SocketAddr, id: &str) -> AuthorityClient {
        AuthorityClient::new(&self.pki, id, self.channel_to(addr, Role::Authority, id))
    }

    /// An EvidenceService client for authority `id` that sends requests as
    /// they are given: unsigned unless the test signs them.
    pub fn authority_unsigned(&self, id: &str) -> EvidenceServiceClient<Channel> {
        EvidenceServiceClient::new(self.channel(Role::Authority, id))
    }

    /// The portal's ConsentService client.
    pub fn portal(&self) -> ConsentServiceClient<Channel> {
        ConsentServiceClient::new(self.channel(Role::Portal, PORTAL))
    }

    /// The auditor's AuditService client.
    pub fn auditor(&self) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(self.channel(Role::Auditor, AUDITOR))
    }

    /// Every audit record, as the auditor sees them.
    pub async fn audit_records(&self) -> Vec<AuditRecord> {
        self.audit_records_at(self.broker_addr()).await
    }

    /// Every audit record, as the auditor sees them at the broker (or
    /// replica) at `addr`.
    pub async fn audit_records_at(&self, addr: SocketAddr) -> Vec<AuditRecord> {
        crate::all_records(self.channel_to(addr, Role::Auditor, AUDITOR)).await
    }
}

fn write_broker_config(dir: &Path, pki: &Pki, settings: &BrokerSettings) -> PathBuf {
    let files = pki.tls_files(Role::Broker, "broker");
    let text = format!(
        r#"listen = "127.0.0.1:0"
data_dir = "data"
policy = "policy.toml"
routing = "routing.toml"
pseudonym_key = "secrets/pseudonym.key"
audit_key = "secrets/audit.key"
shutdown_grace = "5s"

[tls]
ca = {ca:?}
cert = {cert:?}
key = {key:?}
crl = {crl:?}
{tls}

[admin]
listen = "127.0.0.1:0"

[console]
listen = "127.0.0.1:0"

[limits]
max_request_time = "10s"
{limits}
{sections}
"#,
        ca = files.ca,
        cert = files.cert,
        key = files.key,
        crl = pki.crl_path(),
        limits = settings.limits,
        tls = settings.tls,
        sections = settings.sections,
    );
    let path = dir.join("broker.toml");
    std::fs::write(&path, text).expect("broker.toml");
    path
}
