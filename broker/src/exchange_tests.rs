//! The request path, step by step, on stores in memory: each step and each
//! refusal, with the status the caller gets and the one audit record it
//! leaves. The broker is built from its parts ([`Broker::from_parts`]):
//! routing and policy from texts, stores from `onceonly_store::memory`
//! (or a failing one, to try a step whose store is down), TLS from a
//! throw-away PKI made for the test, and the civil mock register, built on
//! the SDK, as the one connector.

use std::path::Path;
use std::sync::Arc;

use onceonly_certs::tls::ReloadableClientTls;
use onceonly_certs::{ClientAuth, Participant, Pki, ReloadableServerTls, Role};
use onceonly_connector_sdk::{ConnectorServer, RunningConnector};
use onceonly_proto::status::reason_of;
use onceonly_proto::v1::{
    AuditRecord, ErrorReason, ExchangeOutcome, RequestEvidenceRequest, RequestEvidenceResponse,
    SubjectId, SubjectIdScheme,
};
use onceonly_registry_mock::{MockRegister, RegisterKind};
use onceonly_store::memory::{MemoryAudit, MemoryConsents, MemoryQuotas, MemoryWindow};
use onceonly_store::{
    AuditFault, AuditStore, Claim, ConsentError, ConsentQuery, ConsentStore, RequestWindow, Shared,
    StoredConsent, StoredOutcome, Stores, WindowError, async_trait,
};
use ring::signature::Ed25519KeyPair;
use tonic::{Code, Status};

use super::*;
use crate::consent::NewConsent;

const ANNA: &str = "82281866209";

const POLICY: &str = r#"
[[rule]]
id = "birth"
callers = ["a", "b"]
evidence_types = ["birth-certificate"]
purposes = ["parental-allowance"]
legal_bases = ["§ 9 Abs. 1 BEEG"]
consent = "not-required"

[[rule]]
id = "residence-with-consent"
callers = ["a"]
evidence_types = ["proof-of-residence"]
purposes = ["parental-allowance"]
legal_bases = ["Art. 6 Abs. 1 lit. a DSGVO"]
consent = "required"

[[quota]]
id = "one-a-minute"
callers = ["b"]
per_minute = 1
burst = 1
"#;

/// A fresh audit signing key.
fn audit_key() -> Ed25519KeyPair {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key")
}

/// A consent store whose every call fails, as one whose database is down.
struct DownConsents;

#[async_trait]
impl ConsentStore for DownConsents {
    async fn insert(&self, _: &StoredConsent) -> Result<(), ConsentError> {
        Err(ConsentError::Storage("down".into()))
    }
    async fn import(&self, _: &StoredConsent) -> Result<bool, ConsentError> {
        Err(ConsentError::Storage("down".into()))
    }
    async fn get(&self, _: &str) -> Result<Option<StoredConsent>, ConsentError> {
        Err(ConsentError::Storage("down".into()))
    }
    async fn revoke(&self, _: &str, _: i64) -> Result<StoredConsent, ConsentError> {
        Err(ConsentError::Storage("down".into()))
    }
    async fn list(
        &self,
        _: &str,
        _: usize,
        _: usize,
    ) -> Result<(Vec<StoredConsent>, bool), ConsentError> {
        Err(ConsentError::Storage("down".into()))
    }
    async fn find_active(
        &self,
        _: &ConsentQuery<'_>,
        _: i64,
    ) -> Result<Option<StoredConsent>, ConsentError> {
        Err(ConsentError::Storage("down".into()))
    }
    async fn all(&self) -> Result<Vec<StoredConsent>, ConsentError> {
        Err(ConsentError::Storage("down".into()))
    }
}

/// A shared request window that cannot be asked.
struct DownWindow;

#[async_trait]
impl RequestWindow for DownWindow {
    async fn claim(&self, _: &str, _: &str, _: &[u8; 32], _: &str) -> Result<Claim, WindowError> {
        Err("down".into())
    }
    async fn store(&self, _: &str, _: &str, _: &str, _: &StoredOutcome) {}
    async fn release(&self, _: &str, _: &str, _: &str) {}
    async fn wait(&self, _: &str, _: &str, _: &str) -> Option<StoredOutcome> {
        None
    }
    async fn sweep(&self) -> Result<u64, WindowError> {
        Ok(0)
    }
}

/// A broker on stores in memory, with the civil mock register behind it.
struct Path_ {
    broker: Arc<Broker>,
    audit: Arc<MemoryAudit>,
    pki: onceonly_certs::pki::ThrowawayPki,
    _register: RunningConnector,
}

impl Path_ {
    async fn new() -> Self {
        Self::build(POLICY, |stores| stores).await
    }

    /// With the memory stores changed by `change` (a store that is down).
    async fn with(change: impl FnOnce(Stores) -> Stores) -> Self {
        Self::build(POLICY, change).await
    }

    /// Under the policy `policy`, with the memory stores changed by
    /// `change`.
    async fn build(policy: &str, change: impl FnOnce(Stores) -> Stores) -> Self {
        let pki = Pki::throwaway(
            "onceonly.test",
            &[
                (Role::Authority, "a"),
                (Role::Authority, "b"),
                (Role::Portal, "p"),
                (Role::Connector, "civil-register"),
            ],
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
        .expect("the register binds")
        .spawn();
        let routing = Arc::new(
            RoutingTable::parse(
                Path::new("routing.toml"),
                &format!(
                    "[connectors.civil-register]\nendpoints = [\"{}\"]\n\
                     [[evidence_types]]\nid = \"birth-certificate\"\nsubject_schemes = [\"DE_IDNR\"]\nroutes = [{{ connector = \"civil-register\" }}]\n\
                     [[evidence_types]]\nid = \"proof-of-residence\"\nsubject_schemes = [\"DE_IDNR\"]\nroutes = [{{ connector = \"civil-register\", jurisdictions = [\"DE-BE\"] }}]\n",
                    register.local_addr()
                ),
            )
            .expect("routing"),
        );
        let policy = crate::policy::Policy::parse(Path::new("policy.toml"), policy, &routing)
            .expect("policy");
        let policy = Arc::new(PolicyStore::with_policy(
            Path::new("policy.toml"),
            policy,
            routing.clone(),
        ));
        let files = pki.tls_files(Role::Broker, "broker");
        let tls = ReloadableServerTls::load_with(files.clone(), ClientAuth::Deferred).expect("tls");
        let client_tls = Arc::new(ReloadableClientTls::load(files.clone()).expect("client tls"));
        let audit = Arc::new(MemoryAudit::new(audit_key()));
        let stores = change(Stores {
            audit: audit.clone(),
            consents: Arc::new(MemoryConsents::default()),
            shared: Some(Shared {
                window: Arc::new(MemoryWindow::default()),
                quotas: Arc::new(MemoryQuotas::default()),
            }),
        });
        let broker = Broker::from_parts(BrokerParts {
            routing,
            policy,
            stores,
            revocations: Arc::default(),
            pseudonyms: Arc::new(Pseudonymiser::from_secret(&[5; 32])),
            forwarder: Forwarder::new(client_tls, "onceonly.test", Default::default()),
            signer: SignerCell::load(&files.cert, &files.key, tls.generation()).expect("signer"),
            tls,
            limits: crate::config::Limits::default(),
            idempotency: crate::config::Idempotency::default(),
            append_seed: Duration::from_millis(1),
        });
        Path_ {
            broker: Arc::new(broker),
            audit,
            pki,
            _register: register,
        }
    }

    /// Anna's consent for authority a's residence requests.
    async fn grant_residence(&self) -> StoredConsent {
        self.broker
            .consents
            .grant(
                crate::consent::Consents::new_consent_id(),
                NewConsent {
                    subject: anna(),
                    authority_id: "spiffe://onceonly.test/authority/a".into(),
                    evidence_type: "proof-of-residence".into(),
                    purpose: "parental-allowance".into(),
                    expires_at_ms: now_ms() + 60_000,
                    recorded_by: "spiffe://onceonly.test/portal/p".into(),
                },
                now_ms(),
            )
            .await
            .expect("granted")
    }

    fn participant(&self, role: Role, id: &str) -> Participant {
        self.pki.participant(role, id).expect("participant")
    }

    /// `request` as `caller` asks it: signed with its key, where it is an
    /// authority of the PKI and the request is not signed yet.
    async fn ask_as(
        &self,
        caller: Participant,
        mut request: RequestEvidenceRequest,
    ) -> Result<RequestEvidenceResponse, Status> {
        let (cert, key) = self.pki.participant_paths(caller.role(), caller.id());
        if request.signed_request.is_empty()
            && caller.role() == Role::Authority
            && let Ok(signer) = onceonly_seal::Signer::from_files(&cert, &key)
        {
            onceonly_seal::sign_request(
                &mut request,
                &signer,
                onceonly_seal::request::DEFAULT_LIFETIME,
            )
            .expect("sign");
        }
        self.broker
            .request_evidence(
                Ok(caller),
                &tonic::metadata::MetadataMap::new(),
                None,
                request,
            )
            .await
    }

    async fn ask(
        &self,
        request: RequestEvidenceRequest,
    ) -> Result<RequestEvidenceResponse, Status> {
        self.ask_as(self.participant(Role::Authority, "a"), request)
            .await
    }

    /// The one record of `request_id`.
    fn record_of(&self, request_id: &str) -> AuditRecord {
        let mut records: Vec<AuditRecord> = self
            .audit
            .records()
            .into_iter()
            .filter(|r| r.request_id == request_id)
            .collect();
        assert_eq!(records.len(), 1, "records of {request_id}: {records:?}");
        records.remove(0)
    }

    /// Asserts `answer` is refused with `code` and `reason`, and that the
    /// request left one record saying so, of `outcome`.
    fn assert_refused(
        &self,
        answer: Result<RequestEvidenceResponse, Status>,
        request_id: &str,
        code: Code,
        reason: ErrorReason,
        outcome: ExchangeOutcome,
    ) -> AuditRecord {
        let status = match answer {
            Ok(response) => panic!("{request_id}: evidence released: {response:?}"),
            Err(status) => status,
        };
        assert_eq!(status.code(), code, "{request_id}: {status:?}");
        assert_eq!(reason_of(&status), Some(reason), "{request_id}: {status:?}");
        let record = self.record_of(request_id);
        assert_eq!(record.outcome(), outcome, "{request_id}: {record:?}");
        assert_eq!(record.status_code, code as i32, "{request_id}");
        assert_eq!(record.error_reason(), reason, "{request_id}");
        assert!(
            record.payload_sha256.is_empty(),
            "{request_id}: a digest of no evidence"
        );
        record
    }
}

fn anna() -> SubjectId {
    SubjectId {
        scheme: SubjectIdScheme::DeIdnr as i32,
        value: ANNA.into(),
    }
}

fn birth(request_id: &str) -> RequestEvidenceRequest {
    RequestEvidenceRequest {
        request_id: request_id.into(),
        evidence_type: "birth-certificate".into(),
        subject: Some(anna()),
        purpose: "parental-allowance".into(),
        legal_basis: "§ 9 Abs. 1 BEEG".into(),
        ..Default::default()
    }
}

fn residence(request_id: &str) -> RequestEvidenceRequest {
    RequestEvidenceRequest {
        request_id: request_id.into(),
        evidence_type: "proof-of-residence".into(),
        subject: Some(anna()),
        purpose: "parental-allowance".into(),
        legal_basis: "Art. 6 Abs. 1 lit. a DSGVO".into(),
        jurisdiction: "DE-BE".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_request_the_policy_allows_is_delivered_and_recorded_before_the_answer() {
    let path = Path_::new().await;
    let answer = path.ask(birth("delivered")).await.expect("delivered");
    let evidence = answer.evidence.expect("evidence");
    let record = path.record_of("delivered");
    assert_eq!(record.outcome(), ExchangeOutcome::Delivered);
    assert_eq!(record.exchange_id, answer.exchange_id);
    assert_eq!(record.policy_rule, "birth", "the rule that allowed it");
    assert_eq!(record.connector_id, "civil-register");
    assert_eq!(record.caller_id, "spiffe://onceonly.test/authority/a");
    assert_eq!(record.payload_sha256, evidence.payload_sha256);
    assert_eq!(answer.audit_log_index, record.log_index);
    assert!(!record.subject_pseudonym.is_empty());
    assert!(
        !format!("{record:?}").contains(ANNA),
        "the subject id is in the record"
    );
}

#[tokio::test]
async fn only_authorities_may_ask() {
    let path = Path_::new().await;
    let answer = path
        .ask_as(path.participant(Role::Portal, "p"), birth("as-portal"))
        .await;
    let record = path.assert_refused(
        answer,
        "as-portal",
        Code::PermissionDenied,
        ErrorReason::RoleNotPermitted,
        ExchangeOutcome::Denied,
    );
    assert_eq!(record.caller_id, "spiffe://onceonly.test/portal/p");
}

#[tokio::test]
async fn a_malformed_request_is_rejected_naming_the_field() {
    let path = Path_::new().await;
    let mut request = birth("bad-subject");
    request.subject = Some(SubjectId {
        scheme: SubjectIdScheme::DeIdnr as i32,
        value: "12345".into(),
    });
    let answer = path.ask(request).await;
    let status = answer.as_ref().expect_err("rejected").clone();
    assert!(status.message().contains("subject"), "{status:?}");
    path.assert_refused(
        answer,
        "bad-subject",
        Code::InvalidArgument,
        ErrorReason::InvalidRequest,
        ExchangeOutcome::Rejected,
    );
}

#[tokio::test]
async fn what_no_rule_allows_is_denied() {
    let path = Path_::new().await;
    let mut request = birth("other-purpose");
    request.purpose = "curiosity".into();
    path.assert_refused(
        path.ask(request).await,
        "other-purpose",
        Code::PermissionDenied,
        ErrorReason::PolicyDenied,
        ExchangeOutcome::Denied,
    );
}

#[tokio::test]
async fn a_consent_bound_request_waits_for_the_consent_and_ends_with_its_revocation() {
    let path = Path_::new().await;
    path.assert_refused(
        path.ask(residence("no-consent")).await,
        "no-consent",
        Code::FailedPrecondition,
        ErrorReason::ConsentMissing,
        ExchangeOutcome::Denied,
    );
    let consent = path.grant_residence().await;
    path.ask(residence("with-consent"))
        .await
        .expect("delivered with the consent");
    assert_eq!(
        path.record_of("with-consent").consent_id,
        consent.consent_id
    );
    path.broker
        .consents
        .revoke(&consent.consent_id, now_ms())
        .await
        .expect("revoked");
    path.assert_refused(
        path.ask(residence("revoked")).await,
        "revoked",
        Code::FailedPrecondition,
        ErrorReason::ConsentMissing,
        ExchangeOutcome::Denied,
    );
}

#[tokio::test]
async fn a_consent_store_that_is_down_refuses_consent_bound_requests_only() {
    let path = Path_::with(|stores| Stores {
        consents: Arc::new(DownConsents),
        ..stores
    })
    .await;
    path.assert_refused(
        path.ask(residence("store-down")).await,
        "store-down",
        Code::Unavailable,
        ErrorReason::BrokerUnavailable,
        ExchangeOutcome::Failed,
    );
    path.ask(birth("no-consent-needed"))
        .await
        .expect("a request without consent does not ask the store");
}

#[tokio::test]
async fn a_jurisdiction_no_register_serves_has_no_route() {
    let path = Path_::new().await;
    let mut request = residence("nowhere");
    request.jurisdiction = "DE-HB".into();
    path.grant_residence().await;
    let record = path.assert_refused(
        path.ask(request).await,
        "nowhere",
        Code::NotFound,
        ErrorReason::NoRoute,
        ExchangeOutcome::Failed,
    );
    assert!(record.connector_id.is_empty(), "no register was chosen");
}

#[tokio::test]
async fn a_caller_over_its_quota_is_refused_with_a_retry_time() {
    let path = Path_::new().await;
    let b = path.participant(Role::Authority, "b");
    path.ask_as(b.clone(), birth("b-first"))
        .await
        .expect("within the quota");
    let answer = path.ask_as(b, birth("b-second")).await;
    let status = answer.as_ref().expect_err("over").clone();
    let retry = onceonly_proto::status::retry_after(&status).expect("RetryInfo");
    assert!(retry > Duration::from_secs(30), "{retry:?}");
    path.assert_refused(
        answer,
        "b-second",
        Code::ResourceExhausted,
        ErrorReason::QuotaExceeded,
        ExchangeOutcome::Denied,
    );
    path.ask(birth("a-unlimited"))
        .await
        .expect("another caller is not limited");
}

#[tokio::test]
async fn evidence_without_its_record_is_never_released() {
    let path = Path_::new().await;
    path.audit.inject(AuditFault::Append);
    let status = path
        .ask(birth("unrecorded"))
        .await
        .expect_err("released without a record");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(reason_of(&status), Some(ErrorReason::AuditUnavailable));
    assert!(path.audit.records().is_empty());
    path.audit.inject(AuditFault::None);
    path.ask(birth("recorded")).await.expect("delivered again");
}

#[tokio::test]
async fn a_repeated_request_id_gets_the_first_outcome_and_another_request_under_it_is_refused() {
    let path = Path_::new().await;
    let first = path.ask(birth("twice")).await.expect("delivered");
    let again = path.ask(birth("twice")).await.expect("the first outcome");
    assert_eq!(again.exchange_id, first.exchange_id);
    let records: Vec<AuditRecord> = path
        .audit
        .records()
        .into_iter()
        .filter(|r| r.request_id == "twice")
        .collect();
    assert_eq!(records.len(), 2, "the repeat leaves its own record");
    assert_eq!(records[1].replay_of_exchange_id, first.exchange_id);

    let mut other = birth("twice");
    other.purpose = "another-purpose".into();
    let status = path.ask(other).await.expect_err("reused");
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(reason_of(&status), Some(ErrorReason::RequestIdReused));
}

#[tokio::test]
async fn a_shared_window_that_cannot_be_asked_runs_nothing() {
    let path = Path_::with(|stores| Stores {
        shared: Some(Shared {
            window: Arc::new(DownWindow),
            quotas: Arc::new(MemoryQuotas::default()),
        }),
        ..stores
    })
    .await;
    path.assert_refused(
        path.ask(birth("window-down")).await,
        "window-down",
        Code::Unavailable,
        ErrorReason::BrokerUnavailable,
        ExchangeOutcome::Failed,
    );
}

#[tokio::test]
async fn a_policy_that_requires_encryption_refuses_a_request_in_clear() {
    let text = format!("{POLICY}\n[encryption]\nrequired_for = [\"birth-certificate\"]\n");
    let path = Path_::build(&text, |stores| stores).await;
    let answer = path.ask(birth("in-clear")).await;
    path.assert_refused(
        answer,
        "in-clear",
        Code::FailedPrecondition,
        ErrorReason::EncryptionRequired,
        ExchangeOutcome::Denied,
    );
}

#[tokio::test]
async fn the_authorize_step_names_its_rule_and_whether_a_consent_is_needed() {
    let path = Path_::new().await;
    let policy = path.broker.policy.current();
    let a = path.participant(Role::Authority, "a");
    let b = path.participant(Role::Authority, "b");
    assert_eq!(
        authorize(&policy, &a, &birth("x")).expect("allowed"),
        ("birth".to_owned(), ConsentRequirement::NotRequired)
    );
    assert_eq!(
        authorize(&policy, &a, &residence("x")).expect("allowed"),
        (
            "residence-with-consent".to_owned(),
            ConsentRequirement::Required
        )
    );
    let denied = authorize(&policy, &b, &residence("x")).expect_err("no rule for b");
    assert_eq!(denied.reason(), ErrorReason::PolicyDenied);
    assert!(
        path.audit.records().is_empty(),
        "a step wrote a record of its own"
    );
}
