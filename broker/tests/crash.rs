//! A broker process under concurrent load is killed with SIGKILL. On reopen
//! every request that got an answer has its audit record, and the log
//! verifies against its last signed head: nothing acknowledged is lost and
//! nothing half-written is visible.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use onceonly_certs::{MtlsConnector, Pki, Role};
use onceonly_connector_sdk::ConnectorServer;
use onceonly_proto::status::reason_of;
use onceonly_proto::v1::evidence_service_client::EvidenceServiceClient;
use onceonly_proto::v1::{AuditRecord, RequestEvidenceRequest, SubjectId, SubjectIdScheme};
use onceonly_registry_mock::{MockRegister, RegisterKind};
use prost::Message;

const WRITERS: usize = 16;
/// Acknowledged requests to wait for before the kill: enough load to mean
/// something, counted rather than timed, so a slow machine only waits longer.
const ACKS_BEFORE_KILL: usize = 200;
/// The most the test waits for them.
const PATIENCE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_sigkill_and_the_log_verifies() {
    let pki = Pki::throwaway(
        "onceonly.test",
        &[(Role::Authority, "a"), (Role::Connector, "civil-register")],
    )
    .expect("pki");
    let register = ConnectorServer::builder(
        MockRegister::embedded(RegisterKind::Civil).expect("data"),
        pki.tls_files(Role::Connector, "civil-register"),
    )
    .allowed_broker("broker")
    .listen("127.0.0.1:0".parse().expect("addr"))
    .bind()
    .await
    .expect("bind")
    .spawn();

    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("routing.toml"),
        format!(
            "[connectors.civil-register]\nendpoints = [\"{}\"]\n[[evidence_types]]\nid = \"birth-certificate\"\nsubject_schemes = [\"DE_IDNR\"]\nroutes = [{{ connector = \"civil-register\" }}]\n",
            register.local_addr()
        ),
    )
    .expect("routing");
    std::fs::write(
        dir.path().join("policy.toml"),
        "[[rule]]\nid = \"r\"\ncallers = [\"a\"]\nevidence_types = [\"birth-certificate\"]\npurposes = [\"p\"]\nlegal_bases = [\"l\"]\nconsent = \"not-required\"\n",
    )
    .expect("policy");
    let tls = pki.tls_files(Role::Broker, "broker");
    std::fs::write(
        dir.path().join("broker.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\npolicy = \"policy.toml\"\nrouting = \"routing.toml\"\npseudonym_key = \"secrets/pseudonym.key\"\naudit_key = \"secrets/audit.key\"\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\ncrl = {:?}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            tls.ca,
            tls.cert,
            tls.key,
            pki.crl_path()
        ),
    )
    .expect("config");

    let init = Command::new(env!("CARGO_BIN_EXE_onceonly-broker"))
        .arg("init")
        .arg("--config")
        .arg(dir.path().join("broker.toml"))
        .output()
        .expect("init runs");
    assert!(init.status.success(), "{init:?}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_onceonly-broker"))
        .arg("serve")
        .arg("--config")
        .arg(dir.path().join("broker.toml"))
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("broker starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("broker printed its address")
            .expect("line");
        if let Some(addr) = line.split("listening on ").nth(1) {
            break addr.trim().to_owned();
        }
    };

    let (config, _) =
        onceonly_certs::tls::client_config(&pki.tls_files(Role::Authority, "a")).expect("tls");
    let authority = pki.participant_paths(Role::Authority, "a");
    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let killed_at: Arc<OnceLock<Instant>> = Arc::default();
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let channel = MtlsConnector::new(config.clone(), None)
            .channel(&addr, Duration::from_secs(2))
            .expect("channel");
        let acknowledged = acknowledged.clone();
        let killed_at = killed_at.clone();
        let authority = authority.clone();
        writers.push(tokio::spawn(async move {
            let mut client = EvidenceServiceClient::new(channel);
            let signer = onceonly_seal::Signer::from_files(&authority.0, &authority.1)
                .expect("the authority's signer");
            let mut n = 0u64;
            // Keep going past the kill, until requests fail for real.
            while killed_at
                .get()
                .is_none_or(|at| at.elapsed() < Duration::from_secs(2))
            {
                let id = format!("w{writer}-{n}");
                n += 1;
                let mut request = RequestEvidenceRequest {
                    request_id: id.clone(),
                    evidence_type: "birth-certificate".into(),
                    subject: Some(SubjectId {
                        scheme: SubjectIdScheme::DeIdnr.into(),
                        value: "82281866209".into(),
                    }),
                    purpose: "p".into(),
                    // Every third request is denied: refusals are records too.
                    legal_basis: if n.is_multiple_of(3) {
                        "other".into()
                    } else {
                        "l".into()
                    },
                    ..Default::default()
                };
                onceonly_seal::sign_request(
                    &mut request,
                    &signer,
                    onceonly_seal::request::DEFAULT_LIFETIME,
                )
                .expect("sign");
                let mut call = tonic::Request::new(request);
                call.set_timeout(Duration::from_secs(2));
                match client.request_evidence(call).await {
                    Ok(_) => {
                        acknowledged.lock().expect("lock").insert(id);
                    }
                    // An answer from the broker (it carries our ErrorInfo)
                    // is an acknowledged request too.
                    Err(status) if reason_of(&status).is_some() => {
                        acknowledged.lock().expect("lock").insert(id);
                    }
                    Err(_) => break,
                }
            }
        }));
    }
    let loading = Instant::now();
    while acknowledged.lock().expect("lock").len() < ACKS_BEFORE_KILL
        && loading.elapsed() < PATIENCE
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().expect("SIGKILL");
    let _ = killed_at.set(Instant::now());
    child.wait().expect("reaped");
    for writer in writers {
        writer.await.expect("writer");
    }

    let acknowledged = acknowledged.lock().expect("lock").clone();
    assert!(
        acknowledged.len() >= ACKS_BEFORE_KILL,
        "too little load to mean anything: {}",
        acknowledged.len()
    );
    let public_key =
        onceonly_broker::auditor::load_public_key(&dir.path().join("secrets/audit.key.pub"))
            .expect("key");
    let verified = onceonly_broker::audit::verify_dir(&dir.path().join("data"), &public_key)
        .expect("the log verifies after the crash");
    assert!(verified.records >= acknowledged.len() as u64);

    let data = dir.path().join("data");
    let recorded: HashSet<String> = onceonly_broker::audit::segment::read_all(
        &data.join(onceonly_broker::audit::segment::FILE_NAME),
    )
    .expect("read the log file")
    .into_iter()
    .flat_map(|(_, frame, _)| frame.records)
    .map(|bytes| {
        AuditRecord::decode(bytes.as_slice())
            .expect("record")
            .request_id
    })
    .collect();
    // And the broker's own reopening gets the same log and goes on from it.
    {
        let db = onceonly_broker::audit::open_storage(sled::Config::new().path(&data))
            .expect("reopen storage");
        let key = onceonly_broker::keys::load_audit_key(&dir.path().join("secrets/audit.key"))
            .expect("key");
        let (log, writer) =
            onceonly_broker::audit::AuditLog::open(&data, &db, true, key).expect("reopen log");
        assert_eq!(log.len(), verified.records);
        assert_eq!(
            log.append(AuditRecord::default()).await.expect("append"),
            verified.records
        );
        drop(log);
        drop(db);
        writer.await.expect("writer");
    }
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !recorded.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged requests lost their records: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    println!(
        "{} requests acknowledged before SIGKILL, {} records after reopen, log verified",
        acknowledged.len(),
        verified.records
    );
}
