//! `onceonly-bench`: what the broker costs, side by side, in one run.
//!
//! Starts, on loopback with mutual TLS everywhere, a mock register connector
//! and two brokers as separate processes (this same binary in its
//! `serve-connector` / `serve-broker` modes), then drives load from N
//! concurrent clients over reused connections and measures, in one run:
//!
//! 1. direct: client -> connector;
//! 2. brokered, audit durable (the default);
//! 3. brokered, audit flushing disabled (what durability costs);
//! 4. brokered, audit durable, the evidence encrypted to the requester
//!    (HPKE) besides signed (every row's evidence is signed by the register
//!    and its signature checked by the broker; direct calls carry a ticket);
//! 5. proxied: HAProxy (Debian package) as a plain mutual-TLS gRPC proxy to
//!    the same register, checking and logging nothing: TLS 1.3 both sides,
//!    h2 to the backend, 2 threads (the fair peer: what an operator would
//!    otherwise put in front of registers); installed with apt-get where
//!    missing and possible, else the row is skipped with the reason;
//! 6. brokered on PostgreSQL (a server of the bench's own, `initdb` in a
//!    temporary directory): one replica, and two replicas sharing one
//!    database with the callers' connections split between them; their
//!    CPU is the replicas' together (PostgreSQL's own is not counted), and
//!    the rows are skipped with the reason where PostgreSQL is missing;
//! 7. bridged: EU requests as EDM XML through the OOTS bridge (in this
//!    process: the XML read and checked, mapped, signed, asked of broker 2
//!    with the evidence encrypted to the bridge, opened and checked against
//!    the register's statement, and the QueryResponse XML written), beside
//!    the brokered-encrypted row it builds on;
//! 8. the raw cost of one flush on this disk (the floor of a durable request);
//!
//! with requests/s, latency p50/p90/p99/max (HDR histogram), the broker's
//! CPU seconds per 1,000 requests and its peak RSS, and the ratios; then
//! full mTLS handshakes per second accepted by the broker, with and without
//! session resumption. Prints a Markdown table; `--json FILE` writes JSON.
//!
//! `cargo run --release -p onceonly-integration-tests --bin onceonly-bench -- --quick`

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use onceonly_certs::{MtlsConnector, Pki, Role};
use onceonly_integration_tests::ticket_claims;
use onceonly_oots_bridge::bridge::Bridge;
use onceonly_oots_bridge::broker::BrokerSource;
use onceonly_oots_bridge::mapping::Mapping;
use onceonly_oots_bridge::transport::domibus::DomibusWs;
use onceonly_oots_bridge::transport::{Message, Payload};
use onceonly_proto::v1::connector_service_client::ConnectorServiceClient;
use onceonly_proto::v1::evidence_service_client::EvidenceServiceClient;
use onceonly_proto::v1::{
    ProvideEvidenceRequest, RequestEvidenceRequest, SubjectId, SubjectIdScheme,
};
use onceonly_seal::Signer;
use onceonly_seal::TicketClaims;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::Channel;

/// mimalloc instead of glibc's malloc, which under load took a quarter of
/// the broker's CPU and kept freed memory per thread (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Measure what the broker adds to a direct call.
#[derive(Debug, Parser)]
#[command(name = "onceonly-bench", version)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// A short run (under 30 s): fewer seconds per measurement.
    #[arg(long)]
    quick: bool,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    concurrency: Vec<usize>,
    /// Seconds of load per measurement (default 10, or 1.5 with --quick).
    #[arg(long)]
    seconds: Option<f64>,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Measure only the scenarios whose name contains one of these,
    /// separated by ';' (e.g. "audit durable;PostgreSQL, 1"), for a
    /// profile of one path or a quicker A/B. Default: all.
    #[arg(long, value_delimiter = ';')]
    only: Vec<String>,
}

// The variants are the internal subcommands' names (serve-...).
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Subcommand)]
enum Mode {
    /// (internal) Run the civil mock register for the benchmark.
    ServeConnector {
        /// The PKI directory.
        #[arg(long)]
        pki: PathBuf,
    },
    /// (internal) Run onceonly-connector as the civil register, from a
    /// mapping file, for the benchmark.
    ServeGeneric {
        /// The PKI directory.
        #[arg(long)]
        pki: PathBuf,
        /// The mapping file.
        #[arg(long)]
        mapping: PathBuf,
    },
    /// (internal) Run a broker for the benchmark.
    ServeBroker {
        /// The broker configuration.
        #[arg(long)]
        config: PathBuf,
    },
}

const ANNA: &str = "82281866209";
/// Client connections shared by the concurrent callers (HTTP/2 multiplexes).
const CONNECTIONS: usize = 8;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.mode {
        Some(Mode::ServeConnector { pki }) => runtime.block_on(serve_connector(&pki)),
        Some(Mode::ServeGeneric { pki, mapping }) => {
            runtime.block_on(serve_generic(&pki, &mapping))
        }
        Some(Mode::ServeBroker { config }) => runtime.block_on(serve_broker(&config)),
        None => runtime.block_on(run(cli)),
    }
}

async fn serve_connector(pki: &Path) -> anyhow::Result<()> {
    let register = onceonly_registry_mock::MockRegister::embedded(
        onceonly_registry_mock::RegisterKind::Civil,
    )?;
    serve_as_civil(pki, register).await
}

async fn serve_generic(pki: &Path, mapping: &Path) -> anyhow::Result<()> {
    serve_as_civil(pki, onceonly_connector::GenericConnector::load(mapping)?).await
}

/// Serves `register` with the civil register's certificate.
async fn serve_as_civil(
    pki: &Path,
    register: impl onceonly_connector_sdk::Connector,
) -> anyhow::Result<()> {
    let pki = Pki::open(pki)?;
    let server = onceonly_connector_sdk::ConnectorServer::builder(
        register,
        pki.tls_files(Role::Connector, "civil-register"),
    )
    .allowed_broker("broker")
    // For the unsigned-requests row, beside the signed ones.
    .accept_unsigned_from(&["bench"])
    .listen("127.0.0.1:0".parse()?)
    .concurrency(1024)
    .bind()
    .await?;
    println!("ADDR {}", server.local_addr());
    std::io::stdout().flush()?;
    server.serve().await?;
    Ok(())
}

async fn serve_broker(config: &Path) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let config = onceonly_broker::BrokerConfig::load(config)?;
    let broker = onceonly_broker::BoundBroker::bind(&config).await?;
    println!("ADDR {}", broker.local_addr());
    std::io::stdout().flush()?;
    broker.serve().await?;
    Ok(())
}

/// A child process of this binary in a serving mode.
struct Server {
    child: tokio::process::Child,
    addr: SocketAddr,
    /// What it was started with, to start it again.
    args: Vec<String>,
}

impl Server {
    async fn start(args: &[&str]) -> anyhow::Result<Self> {
        // The servers log errors (to this process's stderr); set
        // ONCEONLY_BENCH_LOG (a RUST_LOG filter) to see more.
        let filter = std::env::var("ONCEONLY_BENCH_LOG").unwrap_or_else(|_| "error".into());
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(args)
            .env("RUST_LOG", filter)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let line = lines
                .next_line()
                .await?
                .context("server exited before printing its address")?;
            if let Some(addr) = line.strip_prefix("ADDR ") {
                break addr.parse()?;
            }
        };
        Ok(Server {
            child,
            addr,
            args: args.iter().map(|a| a.to_string()).collect(),
        })
    }

    /// Stops it with SIGTERM (as systemd does), waits for its exit, and
    /// starts it again as before: the seconds until it serves again. A
    /// broker reads its whole audit log before it serves (the consent
    /// revocations in it), so this grows with the log.
    async fn restart(&mut self) -> anyhow::Result<f64> {
        let stopped = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?;
        anyhow::ensure!(stopped.success(), "kill -TERM {} failed", self.pid());
        self.child.wait().await?;
        let started = Instant::now();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        *self = Server::start(&args).await?;
        Ok(started.elapsed().as_secs_f64())
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the stat line: here 11 and 12.
    (ticks(11) + ticks(12)) / 100.0
}

/// Peak resident set size of a process so far, MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    scenario: String,
    concurrency: usize,
    requests: u64,
    errors: u64,
    /// The refusals among them, by code and ErrorReason.
    error_kinds: std::collections::BTreeMap<String, u64>,
    requests_per_second: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    broker_cpu_seconds_per_1000: Option<f64>,
    broker_peak_rss_mib: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
struct Handshakes {
    resumption: bool,
    handshakes_per_second: f64,
    resumed_share: f64,
}

/// A broker stopped and started again on the log the run left.
#[derive(Debug, Clone, Serialize)]
struct Restart {
    scenario: String,
    /// The answered requests of the run on its log (each left a record).
    records: u64,
    /// From the restart to serving again.
    seconds: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    cores: usize,
    seconds_per_measurement: f64,
    rows: Vec<Row>,
    handshakes: Vec<Handshakes>,
    restarts: Vec<Restart>,
    ratios: Vec<(String, f64)>,
}

/// What one measurement calls.
#[derive(Clone)]
enum Target {
    /// To the connector, as the broker would call it: each request with a
    /// ticket the broker's key (the first) signs, carrying the request the
    /// authority's key (the second) signs.
    Direct(
        Vec<ConnectorServiceClient<Channel>>,
        Arc<Signer>,
        Arc<Signer>,
    ),
    /// Through a broker, the evidence encrypted to this certificate where
    /// one is given, each request signed by the authority where a signer is
    /// given (as a real authority's client does: a new signature a call).
    Brokered(
        Vec<EvidenceServiceClient<Channel>>,
        Arc<Vec<u8>>,
        Option<Arc<Signer>>,
    ),
    /// An EDM QueryRequest (XML) answered by the OOTS bridge, through a
    /// broker, with a QueryResponse (XML).
    Bridged(Arc<Bridge<DomibusWs, BrokerSource>>),
}

/// The bridge's authority id.
const BRIDGE: &str = "oots-bridge";
/// The legal basis the bridge asks under.
const OOTS_BASIS: &str = "Art. 14 Abs. 1 VO (EU) 2018/1724";
/// The evidence type classification the bridged requests name.
const CLASSIFICATION: &str =
    "https://sr.oots.tech.ec.europa.eu/evidencetypeclassifications/DE/5f4e2a3c-birth";

/// An EU request for Anna's birth certificate, as an access point hands it
/// over: the EDM QueryRequest, request `id` of its own.
fn edm_request(id: u64) -> Message {
    use onceonly_oots_bridge::edm::{NS_QUERY, NS_RIM, NS_SDG};
    let slot = |name: &str, kind: &str, value: &str| {
        format!(
            r#"<r:Slot name="{name}"><r:SlotValue x:type="r:{kind}"><r:Value>{value}</r:Value></r:SlotValue></r:Slot>"#
        )
    };
    let xml = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<q:QueryRequest xmlns:q="{NS_QUERY}" xmlns:r="{NS_RIM}" xmlns:p="{NS_SDG}" xmlns:x="http://www.w3.org/2001/XMLSchema-instance" id="urn:uuid:00000000-0000-4000-8000-{id:012x}">
{}{}{}{}{}
<r:Slot name="EvidenceRequester"><r:SlotValue x:type="r:CollectionValueType"><r:Element x:type="r:AnyValueType"><p:Agent><p:Identifier schemeID="urn:cef.eu:names:identifier:EAS:9930">AT123456789</p:Identifier><p:Name>Stadt Wien</p:Name><p:Classification>ER</p:Classification></p:Agent></r:Element></r:SlotValue></r:Slot>
<r:Slot name="EvidenceProvider"><r:SlotValue x:type="r:AnyValueType"><p:Agent><p:Identifier schemeID="urn:cef.eu:names:identifier:EAS:9930">DE987654321</p:Identifier><p:Name>NOOTS</p:Name></p:Agent></r:SlotValue></r:Slot>
<q:ResponseOption returnType="LeafClassWithRepositoryItem"/>
<q:Query queryDefinition="DocumentQuery">
<r:Slot name="NaturalPerson"><r:SlotValue x:type="r:AnyValueType"><p:Person><p:LevelOfAssurance>High</p:LevelOfAssurance><p:Identifier schemeID="eidas">DE/AT/7f3c9e21a4b8</p:Identifier><p:FamilyName>Schneider</p:FamilyName><p:GivenName>Anna Lena</p:GivenName><p:DateOfBirth>1990-03-14</p:DateOfBirth></p:Person></r:SlotValue></r:Slot>
<r:Slot name="EvidenceRequest"><r:SlotValue x:type="r:AnyValueType"><p:DataServiceEvidenceType><p:Identifier>urn:uuid:7d1c3b8e-birth</p:Identifier><p:EvidenceTypeClassification>{CLASSIFICATION}</p:EvidenceTypeClassification><p:Title lang="EN">Birth certificate</p:Title><p:DistributedAs><p:Format>application/xml</p:Format></p:DistributedAs></p:DataServiceEvidenceType></r:SlotValue></r:Slot>
</q:Query></q:QueryRequest>"#,
        slot("IssueDateTime", "DateTimeValueType", "2026-12-05T10:00:00Z"),
        slot(
            "SpecificationIdentifier",
            "StringValueType",
            "oots-edm:v2.0"
        ),
        r#"<r:Slot name="Procedure"><r:SlotValue x:type="r:InternationalStringValueType"><r:Value><r:LocalizedString xml:lang="EN" value="T1"/></r:Value></r:SlotValue></r:Slot>"#,
        slot("PossibilityForPreview", "BooleanValueType", "false"),
        slot("ExplicitRequestGiven", "BooleanValueType", "true"),
    );
    Message {
        message_id: format!("bench-{id}"),
        conversation_id: format!("conversation-{id}"),
        action: onceonly_oots_bridge::bridge::EXECUTE_QUERY_REQUEST.into(),
        properties: vec![
            (
                "originalSender".into(),
                "urn:cef.eu:names:identifier:EAS:9930:AT123456789".into(),
            ),
            (
                "finalRecipient".into(),
                "urn:cef.eu:names:identifier:EAS:9930:DE987654321".into(),
            ),
            ("ExchangeId".into(), format!("exchange-{id}")),
        ],
        payloads: vec![Payload {
            content_id: "message".into(),
            mime_type: onceonly_oots_bridge::bridge::EDM_MIME.into(),
            bytes: xml.into_bytes(),
        }],
    }
}

/// The bridge in front of the broker at `broker`, as `onceonly-oots-bridge`
/// builds it (its access point is not needed: the bench hands it each
/// message).
fn start_bridge(
    pki: &Pki,
    work: &Path,
    broker: SocketAddr,
) -> anyhow::Result<Arc<Bridge<DomibusWs, BrokerSource>>> {
    let mut encryption = onceonly_certs::IssueOptions::new(Role::Authority, BRIDGE);
    encryption.encryption = true;
    pki.issue(&encryption)?;
    let files = pki.tls_files(Role::Authority, BRIDGE);
    let (enc_cert, enc_key) = pki.encryption_paths(BRIDGE);
    let opener = onceonly_seal::EvidenceOpener::new(
        Arc::new(onceonly_certs::tls::identity_verifier(
            &files,
            "onceonly.test",
        )?),
        Some(onceonly_seal::DecryptionKey::from_files(
            &enc_cert, &enc_key,
        )?),
    );
    let certificate = onceonly_certs::pki::load_certs(&enc_cert)?
        .remove(0)
        .as_ref()
        .to_vec();
    let (cert, key) = pki.participant_paths(Role::Authority, BRIDGE);
    let source = BrokerSource::new(
        channels(pki, Role::Authority, BRIDGE, broker)?.remove(0),
        Arc::new(Signer::from_files(&cert, &key)?),
        Arc::new(opener),
        certificate,
        Duration::from_secs(30),
    );
    let mapping = work.join("oots-mapping.toml");
    std::fs::write(
        &mapping,
        format!(
            "[[evidence]]\nclassification = \"{CLASSIFICATION}\"\nprocedures = [\"T1\"]\nevidence_type = \"birth-certificate\"\nlegal_basis = \"{OOTS_BASIS}\"\nformat = \"application/xml\"\n"
        ),
    )?;
    Ok(Arc::new(Bridge::new(
        DomibusWs::new("http://127.0.0.1:9/unused".parse()?),
        source,
        Mapping::load(&mapping)?,
        onceonly_oots_bridge::edm::request::Agent {
            identifier: "DE987654321".into(),
            scheme: "urn:cef.eu:names:identifier:EAS:9930".into(),
            name: "NOOTS".into(),
            classification: "IP".into(),
        },
    )))
}

fn subject() -> Option<SubjectId> {
    Some(SubjectId {
        scheme: SubjectIdScheme::DeIdnr.into(),
        value: ANNA.into(),
    })
}

/// One call: Ok, or the refusal's code and ErrorReason (for the row's
/// error breakdown).
async fn call(target: &Target, slot: usize, id: u64) -> Result<(), String> {
    let refused = |status: tonic::Status| {
        format!(
            "{:?} {}",
            status.code(),
            onceonly_proto::status::reason_of(&status)
                .map(|r| r
                    .as_str_name()
                    .trim_start_matches("ERROR_REASON_")
                    .to_owned())
                .unwrap_or_else(|| status.message().chars().take(60).collect())
        )
    };
    match target {
        Target::Direct(clients, broker, authority) => {
            let mut client = clients[slot % clients.len()].clone();
            let mut request = ProvideEvidenceRequest {
                exchange_id: format!("ex-{id}"),
                evidence_type: "birth-certificate".into(),
                subject: subject(),
                purpose: "parental-allowance".into(),
                legal_basis: "§ 9 Abs. 1 BEEG".into(),
                requester_id: "spiffe://onceonly.test/authority/bench".into(),
                ..Default::default()
            };
            let signed = onceonly_seal::RequestClaims::for_forwarded(
                &request,
                &request.exchange_id,
                onceonly_seal::unix_now(),
                onceonly_seal::request::DEFAULT_LIFETIME,
            )
            .and_then(|claims| claims.sign(authority))
            .map_err(|e| e.to_string())?;
            request.authorization_ticket = TicketClaims {
                req: signed,
                ..ticket_claims(broker, "onceonly.test", "civil-register", &request)
            }
            .sign(broker)
            .map_err(|e| e.to_string())?;
            client
                .provide_evidence(request)
                .await
                .map(drop)
                .map_err(refused)
        }
        Target::Brokered(clients, encrypt_to, sign_as) => {
            let mut client = clients[slot % clients.len()].clone();
            let mut request = RequestEvidenceRequest {
                request_id: format!("bench-{id}"),
                evidence_type: "birth-certificate".into(),
                subject: subject(),
                purpose: "parental-allowance".into(),
                legal_basis: "§ 9 Abs. 1 BEEG".into(),
                encryption_certificate: encrypt_to.as_ref().clone(),
                ..Default::default()
            };
            if let Some(signer) = sign_as {
                onceonly_seal::sign_request(
                    &mut request,
                    signer,
                    onceonly_seal::request::DEFAULT_LIFETIME,
                )
                .map_err(|e| e.to_string())?;
            }
            client
                .request_evidence(request)
                .await
                .map(drop)
                .map_err(refused)
        }
        Target::Bridged(bridge) => {
            let answer = bridge.answer(&edm_request(id)).await.ok_or("no answer")?;
            if answer.action == "ExecuteQueryResponse" && answer.payloads.len() == 2 {
                return Ok(());
            }
            let document = String::from_utf8_lossy(&answer.payloads[0].bytes).into_owned();
            Err(document
                .split("code=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .map_or_else(|| "an answer without evidence".to_owned(), str::to_owned))
        }
    }
}

/// Drives `concurrency` callers for `seconds` (after a short warm-up).
async fn measure(
    target: &Target,
    concurrency: usize,
    seconds: f64,
    broker_pids: &[u32],
    scenario: &str,
) -> Row {
    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    let warmup = Duration::from_secs_f64((seconds / 5.0).min(1.0));
    let run = |duration: Duration, record: bool| {
        let target = target.clone();
        async move {
            let stop = Instant::now() + duration;
            let mut tasks = Vec::new();
            for slot in 0..concurrency {
                let target = target.clone();
                tasks.push(tokio::spawn(async move {
                    let mut histogram =
                        Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("histogram");
                    let mut errors = std::collections::BTreeMap::<String, u64>::new();
                    while Instant::now() < stop {
                        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
                        let started = Instant::now();
                        match call(&target, slot, id).await {
                            Ok(()) => {
                                if record {
                                    let _ = histogram.record(started.elapsed().as_micros() as u64);
                                }
                            }
                            Err(why) => *errors.entry(why).or_default() += 1,
                        }
                    }
                    (histogram, errors)
                }));
            }
            let mut all = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("histogram");
            let mut errors = std::collections::BTreeMap::<String, u64>::new();
            for task in tasks {
                let (histogram, e) = task.await.expect("caller");
                let _ = all.add(histogram);
                for (why, n) in e {
                    *errors.entry(why).or_default() += n;
                }
            }
            (all, errors)
        }
    };
    run(warmup, false).await;
    let cpu = |pids: &[u32]| pids.iter().map(|pid| cpu_seconds(*pid)).sum::<f64>();
    let cpu_before = cpu(broker_pids);
    let started = Instant::now();
    let (histogram, errors) = run(Duration::from_secs_f64(seconds), true).await;
    let elapsed = started.elapsed().as_secs_f64();
    let requests = histogram.len();
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Row {
        scenario: scenario.into(),
        concurrency,
        requests,
        errors: errors.values().sum(),
        error_kinds: errors,
        requests_per_second: requests as f64 / elapsed,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        max_ms: histogram.max() as f64 / 1000.0,
        broker_cpu_seconds_per_1000: (!broker_pids.is_empty())
            .then(|| (cpu(broker_pids) - cpu_before) * 1000.0 / requests.max(1) as f64),
        // The largest of the replicas'.
        broker_peak_rss_mib: broker_pids
            .iter()
            .map(|pid| peak_rss_mib(*pid))
            .reduce(f64::max),
    }
}

/// The raw cost of one small append plus fdatasync on this disk.
fn raw_flush(dir: &Path, seconds: f64) -> Row {
    let mut file = std::fs::File::create(dir.join("flush-probe")).expect("probe file");
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("histogram");
    let stop = Instant::now() + Duration::from_secs_f64(seconds.min(2.0));
    let started = Instant::now();
    while Instant::now() < stop {
        let t = Instant::now();
        file.write_all(&[0u8; 512]).expect("write");
        file.sync_data().expect("fdatasync");
        let _ = histogram.record(t.elapsed().as_micros() as u64);
    }
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Row {
        scenario: "raw flush (512-byte append + fdatasync)".into(),
        concurrency: 1,
        requests: histogram.len(),
        errors: 0,
        error_kinds: Default::default(),
        requests_per_second: histogram.len() as f64 / started.elapsed().as_secs_f64(),
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        max_ms: histogram.max() as f64 / 1000.0,
        broker_cpu_seconds_per_1000: None,
        broker_peak_rss_mib: None,
    }
}

/// Full mTLS handshakes per second accepted by the broker.
async fn handshakes(
    pki: &Pki,
    broker: SocketAddr,
    resumption: bool,
    seconds: f64,
) -> anyhow::Result<Handshakes> {
    let (config, _) = onceonly_certs::tls::client_config(&pki.tls_files(Role::Authority, "bench"))?;
    let mut config = (*config).clone();
    if !resumption {
        config.resumption = rustls::client::Resumption::disabled();
    }
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let done = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs_f64(seconds.min(3.0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (connector, done, resumed) = (connector.clone(), done.clone(), resumed.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop {
                let Ok(tcp) = tokio::net::TcpStream::connect(broker).await else {
                    continue;
                };
                let name = rustls::pki_types::ServerName::IpAddress(broker.ip().into());
                if let Ok(mut tls) = connector.connect(name, tcp).await {
                    // TLS 1.3 session tickets arrive after the handshake:
                    // read up to the server's first bytes (its HTTP/2
                    // SETTINGS) so the client stores them for resumption.
                    let mut first = [0u8; 1];
                    let _ = tokio::time::timeout(
                        Duration::from_millis(200),
                        tokio::io::AsyncReadExt::read(&mut tls, &mut first),
                    )
                    .await;
                    done.fetch_add(1, Ordering::Relaxed);
                    if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                        resumed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let count = done.load(Ordering::Relaxed);
    Ok(Handshakes {
        resumption,
        handshakes_per_second: count as f64 / started.elapsed().as_secs_f64(),
        resumed_share: resumed.load(Ordering::Relaxed) as f64 / count.max(1) as f64,
    })
}

/// Brokers on the bench's own PostgreSQL: one replica on one database,
/// two on another.
struct Replicated {
    /// The lone replica, then the pair (dropped first: fields drop in
    /// order, and the database goes last).
    replicas: Vec<Server>,
    /// Stopped when dropped.
    _postgres: onceonly_integration_tests::postgres::TestPostgres,
    one: Target,
    two: Target,
}

async fn start_replicated(
    pki: &Pki,
    work: &Path,
    connector: SocketAddr,
) -> anyhow::Result<Replicated> {
    let postgres =
        tokio::task::spawn_blocking(onceonly_integration_tests::postgres::TestPostgres::start)
            .await??;
    let (admin, connection) =
        tokio_postgres::connect(&postgres.url("postgres"), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let mut replicas = Vec::new();
    for (database, count) in [("one_replica", 1), ("two_replicas", 2)] {
        admin
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await?;
        let dir = work.join(database);
        std::fs::create_dir_all(&dir)?;
        let config = write_broker_config_with(
            &dir,
            pki,
            connector,
            true,
            &format!(
                "[storage]\nbackend = \"postgres\"\nurl = \"{}\"\n",
                postgres.url(database)
            ),
        )?;
        for n in 0..count {
            // Each replica its own data directory; keys shared.
            let text = std::fs::read_to_string(&config)?;
            let own = dir.join(format!("broker-{n}.toml"));
            std::fs::write(
                &own,
                text.replacen(
                    "data_dir = \"data\"",
                    &format!("data_dir = \"data-{n}\""),
                    1,
                ),
            )?;
            replicas.push(
                Server::start(&["serve-broker", "--config", &own.display().to_string()]).await?,
            );
        }
    }
    let brokered = |addrs: &[SocketAddr]| -> anyhow::Result<Target> {
        // The callers' connections split between the replicas, as a TCP
        // load balancer would.
        let mut clients = Vec::new();
        for (n, addr) in addrs.iter().enumerate() {
            let share = CONNECTIONS / addrs.len() + usize::from(n < CONNECTIONS % addrs.len());
            clients.extend(
                channels(pki, Role::Authority, "bench", *addr)?
                    .into_iter()
                    .take(share)
                    .map(EvidenceServiceClient::new),
            );
        }
        Ok(Target::Brokered(
            clients,
            Arc::new(Vec::new()),
            Some(bench_authority(pki)?),
        ))
    };
    let one = brokered(&[replicas[0].addr])?;
    let two = brokered(&[replicas[1].addr, replicas[2].addr])?;
    Ok(Replicated {
        replicas,
        _postgres: postgres,
        one,
        two,
    })
}

/// The bench authority's signer (its certificate and key in `pki`).
fn bench_authority(pki: &Pki) -> anyhow::Result<Arc<Signer>> {
    let (cert, key) = pki.participant_paths(Role::Authority, "bench");
    Ok(Arc::new(Signer::from_files(&cert, &key)?))
}

/// Where the generic connector's rows read from.
#[derive(Debug, Clone, Copy)]
enum GenericSource {
    Sqlite,
    Postgres,
}

impl GenericSource {
    fn scenario(self) -> &'static str {
        match self {
            GenericSource::Sqlite => "brokered via onceonly-connector, SQLite",
            GenericSource::Postgres => "brokered via onceonly-connector, PostgreSQL",
        }
    }
}

/// Anna's birth certificate as a register's table, and the mapping that
/// serves it as the civil register's `birth-certificate` (XML, about the
/// mock register's size).
const BIRTHS_SQL: &str = "CREATE TABLE births (idnr TEXT NOT NULL, family_name TEXT NOT NULL, given_names TEXT NOT NULL, birth_date TEXT NOT NULL, birth_place TEXT NOT NULL, registry_office TEXT NOT NULL, entry TEXT NOT NULL);
CREATE INDEX births_by_idnr ON births (idnr);
INSERT INTO births VALUES ('82281866209', 'Schneider', 'Anna Lena', '1990-04-12', 'Berlin', 'Standesamt Berlin-Mitte', 'G 1234/1990');";

fn births_mapping(source: &str) -> String {
    format!(
        r#"[sources.births]
{source}

[[evidence_types]]
id = "birth-certificate"
display_name = "Birth certificate"
subject_schemes = ["DE_IDNR"]
media_type = "application/xml"
source = "births"
query = "SELECT family_name, given_names, birth_date, birth_place, registry_office, entry FROM births WHERE idnr = :subject"
template = """<?xml version="1.0" encoding="UTF-8"?>
<BirthCertificate xmlns="urn:onceonly:sample:civil:1">
  <Person><FamilyName>{{{{ family_name }}}}</FamilyName><GivenNames>{{{{ given_names }}}}</GivenNames><IDNr>{{{{ subject }}}}</IDNr></Person>
  <Birth><Date>{{{{ birth_date }}}}</Date><Place>{{{{ birth_place }}}}</Place></Birth>
  <Registry><Office>{{{{ registry_office }}}}</Office><Entry>{{{{ entry }}}}</Entry></Registry>
</BirthCertificate>"""
"#
    )
}

/// A generic connector process and the broker routed to it.
struct Generic {
    source: GenericSource,
    /// Kept running while measured.
    _connector: Server,
    broker: Server,
    _postgres: Option<onceonly_integration_tests::postgres::TestPostgres>,
}

async fn start_generic(pki: &Pki, work: &Path, source: GenericSource) -> anyhow::Result<Generic> {
    let dir = work.join(match source {
        GenericSource::Sqlite => "generic-sqlite",
        GenericSource::Postgres => "generic-postgres",
    });
    std::fs::create_dir_all(&dir)?;
    let (source_table, postgres) = match source {
        GenericSource::Sqlite => {
            rusqlite::Connection::open(dir.join("births.db"))?.execute_batch(BIRTHS_SQL)?;
            (
                "kind = \"sqlite\"\npath = \"births.db\"\npool_size = 16".to_owned(),
                None,
            )
        }
        GenericSource::Postgres => {
            let postgres = tokio::task::spawn_blocking(
                onceonly_integration_tests::postgres::TestPostgres::start,
            )
            .await??;
            let url = postgres.url("postgres");
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            client.batch_execute(BIRTHS_SQL).await?;
            (
                format!("kind = \"postgres\"\nurl = \"{url}\"\npool_size = 16"),
                Some(postgres),
            )
        }
    };
    let mapping = dir.join("mapping.toml");
    std::fs::write(&mapping, births_mapping(&source_table))?;
    let connector = Server::start(&[
        "serve-generic",
        "--pki",
        &pki.dir().display().to_string(),
        "--mapping",
        &mapping.display().to_string(),
    ])
    .await?;
    let config = write_broker_config(&dir, pki, connector.addr, true)?;
    let broker =
        Server::start(&["serve-broker", "--config", &config.display().to_string()]).await?;
    Ok(Generic {
        source,
        _connector: connector,
        broker,
        _postgres: postgres,
    })
}

fn write_broker_config(
    dir: &Path,
    pki: &Pki,
    connector: SocketAddr,
    durable: bool,
) -> anyhow::Result<PathBuf> {
    write_broker_config_with(dir, pki, connector, durable, "")
}

fn write_broker_config_with(
    dir: &Path,
    pki: &Pki,
    connector: SocketAddr,
    durable: bool,
    sections: &str,
) -> anyhow::Result<PathBuf> {
    let tls = pki.tls_files(Role::Broker, "broker");
    std::fs::write(
        dir.join("routing.toml"),
        format!(
            "[connectors.civil-register]\nendpoints = [\"{connector}\"]\n[[evidence_types]]\nid = \"birth-certificate\"\nmedia_types = [\"application/xml\"]\nsubject_schemes = [\"DE_IDNR\", \"EIDAS\"]\nparameters = [{{ name = \"family_name\" }}, {{ name = \"given_names\" }}, {{ name = \"date_of_birth\" }}]\nroutes = [{{ connector = \"civil-register\" }}]\n"
        ),
    )?;
    std::fs::write(
        dir.join("policy.toml"),
        "[[rule]]\nid = \"bench\"\ncallers = [\"bench\"]\nevidence_types = [\"birth-certificate\"]\npurposes = [\"parental-allowance\"]\nlegal_bases = [\"§ 9 Abs. 1 BEEG\"]\nconsent = \"not-required\"\n\n# The bridged row: the OOTS bridge, for procedure T1.\n[[rule]]\nid = \"oots\"\ncallers = [\"oots-bridge\"]\nevidence_types = [\"birth-certificate\"]\npurposes = [\"oots:T1\"]\nlegal_bases = [\"Art. 14 Abs. 1 VO (EU) 2018/1724\"]\nconsent = \"not-required\"\n\n# The unsigned-requests row measures what signing costs.\n[signed_requests]\nunsigned_allowed = [\"bench\"]\n\n# A quota far above the load: every request pays for the check.\n[[quota]]\nid = \"bench\"\ncallers = [\"bench\"]\nper_second = 1000000\nburst = 1000000\n",
    )?;
    let path = dir.join("broker.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\npolicy = \"policy.toml\"\nrouting = \"routing.toml\"\npseudonym_key = \"secrets/pseudonym.key\"\naudit_key = \"secrets/audit.key\"\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\ncrl = {:?}\n[admin]\nlisten = \"127.0.0.1:0\"\n[limits]\nconcurrency = 4096\n[audit]\ndurable = {durable}\n{sections}",
            tls.ca,
            tls.cert,
            tls.key,
            pki.crl_path()
        ),
    )?;
    onceonly_broker::keys::init(&onceonly_broker::BrokerConfig::load(&path)?)?;
    Ok(path)
}

fn channels(pki: &Pki, role: Role, id: &str, addr: SocketAddr) -> anyhow::Result<Vec<Channel>> {
    let (config, _) = onceonly_certs::tls::client_config(&pki.tls_files(role, id))?;
    (0..CONNECTIONS)
        .map(|_| {
            Ok(MtlsConnector::new(config.clone(), None)
                .channel(&addr.to_string(), Duration::from_secs(5))?)
        })
        .collect()
}

/// HAProxy in front of the register, as a plain mTLS gRPC proxy.
struct Haproxy {
    child: tokio::process::Child,
    addr: SocketAddr,
}

/// Finds (or, as root, installs from the Debian packages) HAProxy and starts
/// it in front of `connector` with the broker's certificate on both sides;
/// Err says why it cannot run here.
async fn start_haproxy(pki: &Pki, dir: &Path, connector: SocketAddr) -> Result<Haproxy, String> {
    let present = |program: &str| {
        std::process::Command::new(program)
            .arg("-v")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !present("haproxy") {
        let installed = std::process::Command::new("apt-get")
            .args(["install", "-y", "-qq", "haproxy"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !installed || !present("haproxy") {
            return Err("haproxy is not installed and `apt-get install haproxy` failed (not root, or no package registry)".into());
        }
    }
    let (cert, key) = pki.participant_paths(Role::Broker, "broker");
    let combined = dir.join("broker-combined.pem");
    let pem = std::fs::read_to_string(&cert).map_err(|e| e.to_string())?
        + &std::fs::read_to_string(&key).map_err(|e| e.to_string())?;
    std::fs::write(&combined, pem).map_err(|e| e.to_string())?;
    // A free port: bound, read, released (HAProxy binds it right after).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let ca = pki.ca_cert_path();
    let config = format!(
        "global\n  nbthread 2\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n  ssl-default-server-options ssl-min-ver TLSv1.3\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend grpc\n  bind {addr} ssl crt {crt} ca-file {ca} verify required alpn h2\n  default_backend register\n\
         backend register\n  server civil {connector} ssl crt {crt} ca-file {ca} verify required alpn h2\n",
        crt = combined.display(),
        ca = ca.display(),
    );
    let config_path = dir.join("haproxy.cfg");
    std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
    let child = tokio::process::Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&config_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start haproxy: {e}"))?;
    let until = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > until {
            return Err(format!("haproxy did not listen on {addr} within 10 s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Haproxy { child, addr })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let seconds = cli.seconds.unwrap_or(if cli.quick { 1.5 } else { 10.0 });
    let pki = Pki::throwaway(
        "onceonly.test",
        &[
            (Role::Authority, "bench"),
            (Role::Authority, BRIDGE),
            (Role::Connector, "civil-register"),
        ],
    )?;
    let work = tempfile::tempdir()?;
    let pki_dir = pki.dir().display().to_string();
    let connector = Server::start(&["serve-connector", "--pki", &pki_dir]).await?;
    let mut brokers = Vec::new();
    for durable in [true, false] {
        let dir = work
            .path()
            .join(if durable { "durable" } else { "no-flush" });
        std::fs::create_dir_all(&dir)?;
        let config = write_broker_config(&dir, &pki, connector.addr, durable)?;
        brokers.push(
            Server::start(&["serve-broker", "--config", &config.display().to_string()]).await?,
        );
    }
    let (broker_cert, broker_key) = pki.participant_paths(Role::Broker, "broker");
    let broker_signer = Arc::new(Signer::from_files(&broker_cert, &broker_key)?);
    let authority_signer = bench_authority(&pki)?;
    // As the broker calls the register: its certificate, a ticket a call.
    let as_broker_to = |addr: SocketAddr| -> anyhow::Result<Target> {
        Ok(Target::Direct(
            channels(&pki, Role::Broker, "broker", addr)?
                .into_iter()
                .map(ConnectorServiceClient::new)
                .collect(),
            broker_signer.clone(),
            authority_signer.clone(),
        ))
    };
    let direct = as_broker_to(connector.addr)?;
    let mut encryption = onceonly_certs::IssueOptions::new(Role::Authority, "bench");
    encryption.encryption = true;
    pki.issue(&encryption)?;
    let encryption_certificate = onceonly_certs::pki::load_certs(&pki.encryption_paths("bench").0)?
        .remove(0)
        .as_ref()
        .to_vec();
    let brokered_to =
        |broker: &Server, encrypt_to: Vec<u8>, signed: bool| -> anyhow::Result<Target> {
            Ok(Target::Brokered(
                channels(&pki, Role::Authority, "bench", broker.addr)?
                    .into_iter()
                    .map(EvidenceServiceClient::new)
                    .collect(),
                Arc::new(encrypt_to),
                signed.then(|| authority_signer.clone()),
            ))
        };
    let brokered = [
        brokered_to(&brokers[0], Vec::new(), true)?,
        brokered_to(&brokers[1], Vec::new(), true)?,
        brokered_to(&brokers[0], encryption_certificate, true)?,
        brokered_to(&brokers[0], Vec::new(), false)?,
    ];
    let bridged = Target::Bridged(start_bridge(&pki, work.path(), brokers[0].addr)?);

    let haproxy = match start_haproxy(&pki, work.path(), connector.addr).await {
        Ok(haproxy) => Some((as_broker_to(haproxy.addr)?, haproxy)),
        Err(why) => {
            println!("skipped: proxied: HAProxy: {why}");
            None
        }
    };

    // The civil register again, served by onceonly-connector from a
    // mapping file over SQLite and over PostgreSQL, each behind a broker
    // of its own configured as brokers[0] is.
    let mut generic = Vec::new();
    for source in [GenericSource::Sqlite, GenericSource::Postgres] {
        match start_generic(&pki, work.path(), source).await {
            Ok(started) => {
                let target = brokered_to(&started.broker, Vec::new(), true)?;
                generic.push((target, started));
            }
            Err(why) => println!("skipped: {}: {why:#}", source.scenario()),
        }
    }

    let mut replicated = match start_replicated(&pki, work.path(), connector.addr).await {
        Ok(replicated) => Some(replicated),
        Err(why) => {
            println!("skipped: brokered on PostgreSQL: {why:#}");
            None
        }
    };

    let wanted = |scenario: &str| {
        cli.only.is_empty() || cli.only.iter().any(|part| scenario.contains(part.as_str()))
    };
    let mut rows = Vec::new();
    for &concurrency in &cli.concurrency {
        eprintln!("measuring at concurrency {concurrency} ...");
        if let Some((proxied, proxy)) = haproxy.as_ref().filter(|_| wanted("proxied: HAProxy")) {
            rows.push(
                measure(
                    proxied,
                    concurrency,
                    seconds,
                    // Its CPU and memory, beside the broker's.
                    proxy.child.id().as_slice(),
                    "proxied: HAProxy, no checks",
                )
                .await,
            );
        }
        if wanted("direct: client -> connector") {
            rows.push(
                measure(
                    &direct,
                    concurrency,
                    seconds,
                    &[],
                    "direct: client -> connector",
                )
                .await,
            );
        }
        if wanted("brokered, audit durable") {
            rows.push(
                measure(
                    &brokered[0],
                    concurrency,
                    seconds,
                    &[brokers[0].pid()],
                    "brokered, audit durable",
                )
                .await,
            );
        }
        if wanted("brokered, audit durable, unsigned requests") {
            rows.push(
                measure(
                    &brokered[3],
                    concurrency,
                    seconds,
                    &[brokers[0].pid()],
                    "brokered, audit durable, unsigned requests",
                )
                .await,
            );
        }
        if wanted("brokered, audit not flushed") {
            rows.push(
                measure(
                    &brokered[1],
                    concurrency,
                    seconds,
                    &[brokers[1].pid()],
                    "brokered, audit not flushed",
                )
                .await,
            );
        }
        if wanted("brokered, audit durable, encrypted to the requester") {
            rows.push(
                measure(
                    &brokered[2],
                    concurrency,
                    seconds,
                    &[brokers[0].pid()],
                    "brokered, audit durable, encrypted to the requester",
                )
                .await,
            );
        }
        if wanted("bridged") {
            rows.push(
                measure(
                    &bridged,
                    concurrency,
                    seconds,
                    &[brokers[0].pid()],
                    "bridged: EDM XML in and out, through the broker, encrypted to the bridge",
                )
                .await,
            );
        }
        for (target, started) in generic.iter().filter(|(_, g)| wanted(g.source.scenario())) {
            rows.push(
                measure(
                    target,
                    concurrency,
                    seconds,
                    &[started.broker.pid()],
                    started.source.scenario(),
                )
                .await,
            );
        }
        if let Some(replicated) = &replicated {
            for (target, pids, scenario) in [
                (
                    &replicated.one,
                    vec![replicated.replicas[0].pid()],
                    "brokered on PostgreSQL, 1 replica",
                ),
                (
                    &replicated.two,
                    vec![replicated.replicas[1].pid(), replicated.replicas[2].pid()],
                    "brokered on PostgreSQL, 2 replicas",
                ),
            ] {
                if !wanted(scenario) {
                    continue;
                }
                rows.push(measure(target, concurrency, seconds, &pids, scenario).await);
            }
        }
    }
    let flush = raw_flush(work.path(), seconds);
    rows.push(flush.clone());
    eprintln!("measuring handshakes ...");
    let handshakes = vec![
        handshakes(&pki, brokers[0].addr, false, seconds).await?,
        handshakes(&pki, brokers[0].addr, true, seconds).await?,
    ];

    // Each broker with the most records, stopped and started again.
    let answered = |prefix: &str| {
        rows.iter()
            .filter(|r| r.scenario.starts_with(prefix))
            .map(|r| r.requests - r.errors)
            .sum::<u64>()
    };
    eprintln!("restarting brokers on their logs ...");
    let mut restarts = vec![Restart {
        scenario: "embedded, audit durable".into(),
        records: answered("brokered, audit durable"),
        seconds: brokers[0].restart().await?,
    }];
    if let Some(replicated) = &mut replicated {
        restarts.push(Restart {
            scenario: "PostgreSQL, 1 replica".into(),
            records: answered("brokered on PostgreSQL, 1"),
            seconds: replicated.replicas[0].restart().await?,
        });
    }

    let mut ratios = Vec::new();
    for &concurrency in &cli.concurrency {
        let find = |scenario: &str| {
            rows.iter()
                .find(|r| r.concurrency == concurrency && r.scenario.starts_with(scenario))
        };
        if let (Some(d), Some(b), Some(n)) = (
            find("direct"),
            find("brokered, audit durable"),
            find("brokered, audit not"),
        ) {
            ratios.push((
                format!("c={concurrency}: brokered-durable / direct throughput"),
                b.requests_per_second / d.requests_per_second,
            ));
            ratios.push((
                format!("c={concurrency}: durable / not-flushed throughput"),
                b.requests_per_second / n.requests_per_second,
            ));
            ratios.push((
                format!("c={concurrency}: brokered-durable p50 - direct p50 - one flush p50 (ms)"),
                b.p50_ms - d.p50_ms - flush.p50_ms,
            ));
        }
        if let (Some(e), Some(x), Some(d)) = (
            find("brokered, audit durable, encrypted"),
            find("bridged"),
            find("direct"),
        ) {
            ratios.push((
                format!("c={concurrency}: bridged (EDM XML) / brokered-encrypted gRPC throughput"),
                x.requests_per_second / e.requests_per_second,
            ));
            ratios.push((
                format!("c={concurrency}: bridged / direct throughput"),
                x.requests_per_second / d.requests_per_second,
            ));
            ratios.push((
                format!("c={concurrency}: bridged p50 - brokered-encrypted p50 (ms)"),
                x.p50_ms - e.p50_ms,
            ));
        }
        if let (Some(b), Some(h)) = (find("brokered, audit durable"), find("proxied: HAProxy")) {
            ratios.push((
                format!("c={concurrency}: brokered-durable / HAProxy throughput"),
                b.requests_per_second / h.requests_per_second,
            ));
            ratios.push((
                format!("c={concurrency}: brokered-durable p50 - HAProxy p50 (ms)"),
                b.p50_ms - h.p50_ms,
            ));
        }
        if let (Some(b), Some(one), Some(two)) = (
            find("brokered, audit durable"),
            find("brokered on PostgreSQL, 1"),
            find("brokered on PostgreSQL, 2"),
        ) {
            ratios.push((
                format!("c={concurrency}: 1 replica on PostgreSQL / embedded throughput"),
                one.requests_per_second / b.requests_per_second,
            ));
            ratios.push((
                format!("c={concurrency}: 2 replicas / 1 replica on PostgreSQL throughput"),
                two.requests_per_second / one.requests_per_second,
            ));
        }
        for source in [GenericSource::Sqlite, GenericSource::Postgres] {
            if let (Some(b), Some(g)) = (find("brokered, audit durable"), find(source.scenario())) {
                ratios.push((
                    format!(
                        "c={concurrency}: {} / registry-mock brokered throughput",
                        source.scenario()
                    ),
                    g.requests_per_second / b.requests_per_second,
                ));
            }
        }
        if let (Some(b), Some(u)) = (
            find("brokered, audit durable"),
            find("brokered, audit durable, unsigned"),
        ) {
            ratios.push((
                format!("c={concurrency}: signed / unsigned requests brokered throughput"),
                b.requests_per_second / u.requests_per_second,
            ));
            ratios.push((
                format!("c={concurrency}: signed p50 - unsigned p50 (ms)"),
                b.p50_ms - u.p50_ms,
            ));
        }
        if let (Some(b), Some(e)) = (
            find("brokered, audit durable"),
            find("brokered, audit durable, encrypted"),
        ) {
            ratios.push((
                format!("c={concurrency}: encrypted / clear (both signed) brokered throughput"),
                e.requests_per_second / b.requests_per_second,
            ));
        }
    }
    let report = Report {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        seconds_per_measurement: seconds,
        rows,
        handshakes,
        restarts,
        ratios,
    };
    print_markdown(&report);
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        println!("\nJSON written to {}", path.display());
    }
    drop(brokers);
    drop(connector);
    Ok(())
}

fn print_markdown(report: &Report) {
    println!(
        "\n# onceonly-bench: {} cores, {} s per measurement, mutual TLS 1.3 on loopback\n",
        report.cores, report.seconds_per_measurement
    );
    println!(
        "| scenario | concurrency | req/s | p50 ms | p90 ms | p99 ms | max ms | broker (or proxy) CPU s / 1000 req | broker (or proxy) peak RSS MiB | errors |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &report.rows {
        let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        println!(
            "| {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} |",
            r.scenario,
            r.concurrency,
            r.requests_per_second,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.max_ms,
            opt(r.broker_cpu_seconds_per_1000),
            opt(r.broker_peak_rss_mib),
            r.errors
        );
    }
    for r in report.rows.iter().filter(|r| r.errors > 0) {
        let kinds: Vec<String> = r
            .error_kinds
            .iter()
            .map(|(why, n)| format!("{why} x{n}"))
            .collect();
        println!(
            "\nerrors, {} at c={}: {}",
            r.scenario,
            r.concurrency,
            kinds.join(", ")
        );
    }
    println!("\n| ratio | value |\n| --- | ---: |");
    for (name, value) in &report.ratios {
        println!("| {name} | {value:.2} |");
    }
    println!(
        "\n| new mTLS connections to the broker | handshakes/s | resumed |\n| --- | ---: | ---: |"
    );
    for h in &report.handshakes {
        println!(
            "| {} | {:.0} | {:.0} % |",
            if h.resumption {
                "with session resumption"
            } else {
                "full handshakes"
            },
            h.handshakes_per_second,
            h.resumed_share * 100.0
        );
    }
    if !report.restarts.is_empty() {
        println!(
            "\n| broker stopped (SIGTERM) and started again | records in its log | s until it serves |\n| --- | ---: | ---: |"
        );
        for r in &report.restarts {
            println!("| {} | {} | {:.2} |", r.scenario, r.records, r.seconds);
        }
    }
}
