//! Requests signed by the authority, tried as each actor would: a broker
//! (or whoever holds a broker key) that makes up a request, a party in
//! between that alters one, and a broker that passes old evidence off as
//! the answer to a new request. Each door is tried on a real broker and
//! real connectors over mutual TLS.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use onceonly_certs::tls::identity_verifier;
use onceonly_certs::{Pki, Role};
use onceonly_integration_tests::probe::ProbeRegister;
use onceonly_integration_tests::world::{ANNA, World, birth_certificate};
use onceonly_integration_tests::{
    TRUST_DOMAIN, assert_refused_before_the_register, channel_as, pki_with, start_connector,
    ticket_claims, ticket_with_request,
};
use onceonly_proto::status::{reason_of, violated_fields};
use onceonly_proto::v1::connector_service_client::ConnectorServiceClient;
use onceonly_proto::v1::{
    ErrorReason, ExchangeOutcome, ProvideEvidenceRequest, RequestEvidenceRequest, SubjectId,
    SubjectIdScheme,
};
use onceonly_seal::{
    EvidenceOpener, Expected, OpenError, RequestClaims, Signer, TicketClaims, sign_request,
};
use sha2::{Digest, Sha256};
use tonic::Code;

const BERLIN: &str = "elterngeld-berlin";
const MUENCHEN: &str = "elterngeld-muenchen";
const PATIENCE: Duration = Duration::from_secs(20);

fn signer(pki: &Pki, role: Role, id: &str) -> Signer {
    let (cert, key) = pki.participant_paths(role, id);
    Signer::from_files(&cert, &key).expect("signer")
}

fn forwarded(exchange_id: &str) -> ProvideEvidenceRequest {
    ProvideEvidenceRequest {
        exchange_id: exchange_id.into(),
        evidence_type: "birth-certificate".into(),
        subject: Some(SubjectId {
            scheme: SubjectIdScheme::DeIdnr.into(),
            value: ANNA.into(),
        }),
        purpose: "parental-allowance".into(),
        legal_basis: "§ 9 Abs. 1 BEEG".into(),
        requester_id: format!("spiffe://{TRUST_DOMAIN}/authority/{BERLIN}"),
        ..Default::default()
    }
}

/// `token` with its claims edited and the authority's signature kept.
fn edited(token: &str, edit: impl FnOnce(&mut RequestClaims)) -> String {
    let mut claims = RequestClaims::read_unverified(token).expect("claims");
    edit(&mut claims);
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts[1] = onceonly_seal::base64_url(&serde_json::to_vec(&claims).expect("json"));
    parts.join(".")
}

#[tokio::test]
async fn a_ticket_minted_with_a_valid_broker_key_for_a_request_no_authority_signed_is_refused_before_the_register()
 {
    let pki = pki_with(&[
        (Role::Connector, "civil-register"),
        (Role::Authority, BERLIN),
        (Role::Authority, MUENCHEN),
    ]);
    let (probe, counts) = ProbeRegister::new(Duration::ZERO);
    let _connector = start_connector(&pki, "civil-register", probe).await;
    let addr = _connector.local_addr();
    let broker = signer(&pki, Role::Broker, "broker");
    let mut client =
        ConnectorServiceClient::new(channel_as(&pki, Role::Broker, "broker", addr, None));
    let mut refusals: Vec<(&str, ProvideEvidenceRequest, ErrorReason)> = Vec::new();

    // The broker's own ticket, for a request nobody signed.
    let mut unsigned = forwarded("ex-unsigned");
    unsigned.authorization_ticket =
        ticket_claims(&broker, TRUST_DOMAIN, "civil-register", &unsigned)
            .sign(&broker)
            .expect("sign");
    refusals.push((
        "no signed request",
        unsigned,
        ErrorReason::SignedRequestMissing,
    ));

    // The broker signs the request itself, as if it were the authority.
    let mut by_broker = forwarded("ex-by-broker");
    let claims = RequestClaims::for_forwarded(
        &by_broker,
        "made-up",
        onceonly_seal::unix_now(),
        onceonly_seal::request::DEFAULT_LIFETIME,
    )
    .expect("claims");
    by_broker.authorization_ticket = TicketClaims {
        req: claims.sign(&broker).expect("sign"),
        ..ticket_claims(&broker, TRUST_DOMAIN, "civil-register", &by_broker)
    }
    .sign(&broker)
    .expect("sign");
    refusals.push((
        "signed by the broker",
        by_broker,
        ErrorReason::SignedRequestInvalid,
    ));

    // Another authority's real signature, on a request in Berlin's name.
    let mut other = forwarded("ex-other-authority");
    let claims = RequestClaims {
        iss: format!("spiffe://{TRUST_DOMAIN}/authority/{MUENCHEN}"),
        ..RequestClaims::for_forwarded(
            &other,
            "r",
            onceonly_seal::unix_now(),
            onceonly_seal::request::DEFAULT_LIFETIME,
        )
        .expect("claims")
    };
    other.authorization_ticket = TicketClaims {
        req: claims
            .sign(&signer(&pki, Role::Authority, MUENCHEN))
            .expect("sign"),
        ..ticket_claims(&broker, TRUST_DOMAIN, "civil-register", &other)
    }
    .sign(&broker)
    .expect("sign");
    refusals.push((
        "signed by another authority",
        other,
        ErrorReason::SignedRequestInvalid,
    ));

    // Berlin's signature on the request for Anna, the ticket and the
    // request for someone else.
    let mut moved = forwarded("ex-moved");
    let signed_for_anna = ticket_with_request(&pki, &broker, "civil-register", &moved).req;
    moved.subject = Some(SubjectId {
        scheme: SubjectIdScheme::DeIdnr.into(),
        value: "86095742719".into(),
    });
    moved.authorization_ticket = TicketClaims {
        req: signed_for_anna,
        ..ticket_claims(&broker, TRUST_DOMAIN, "civil-register", &moved)
    }
    .sign(&broker)
    .expect("sign");
    refusals.push((
        "signed for another subject",
        moved,
        ErrorReason::SignedRequestMismatch,
    ));

    // Berlin's signature with its purpose edited.
    let mut altered = forwarded("ex-altered");
    let good = ticket_with_request(&pki, &broker, "civil-register", &altered);
    altered.authorization_ticket = TicketClaims {
        req: edited(&good.req, |c| c.pur = "something-else".into()),
        ..good
    }
    .sign(&broker)
    .expect("sign");
    refusals.push((
        "altered after signing",
        altered,
        ErrorReason::SignedRequestInvalid,
    ));

    // Expired: signed long ago, for a short while.
    let mut expired = forwarded("ex-expired");
    let now = onceonly_seal::unix_now();
    let claims = RequestClaims {
        iat: now - 900,
        exp: now - 600,
        ..RequestClaims::for_forwarded(&expired, "r", now, onceonly_seal::request::DEFAULT_LIFETIME)
            .expect("claims")
    };
    expired.authorization_ticket = TicketClaims {
        req: claims
            .sign(&signer(&pki, Role::Authority, BERLIN))
            .expect("sign"),
        ..ticket_claims(&broker, TRUST_DOMAIN, "civil-register", &expired)
    }
    .sign(&broker)
    .expect("sign");
    refusals.push(("expired", expired, ErrorReason::SignedRequestInvalid));

    assert_refused_before_the_register(&mut client, refusals, &counts).await;

    // One signed request answers one exchange: the broker cannot run it
    // again under another exchange id (a new ticket for each).
    let first = forwarded("ex-first");
    let ticket = ticket_with_request(&pki, &broker, "civil-register", &first);
    let signed = ticket.req.clone();
    let mut request = first.clone();
    request.authorization_ticket = ticket.sign(&broker).expect("sign");
    let answered = client
        .provide_evidence(request)
        .await
        .expect("a signed request is answered")
        .into_inner();
    let statement = answered.evidence.expect("evidence").register_jws;
    let stated = onceonly_seal::StatementClaims::verify(
        &statement,
        &identity_verifier(&pki.tls_files(Role::Broker, "broker"), TRUST_DOMAIN).expect("trust"),
    )
    .expect("statement")
    .claims;
    assert_eq!(
        stated.non,
        RequestClaims::read_unverified(&signed).expect("claims").non,
        "the statement names the request's nonce"
    );
    assert_eq!(stated.rqd, onceonly_seal::request::signed_digest(&signed));
    // A retry of the same exchange (a new ticket) is answered.
    let mut retry = first.clone();
    retry.authorization_ticket = TicketClaims {
        req: signed.clone(),
        ..ticket_claims(&broker, TRUST_DOMAIN, "civil-register", &retry)
    }
    .sign(&broker)
    .expect("sign");
    client
        .provide_evidence(retry)
        .await
        .expect("the same exchange again");
    let mut again = forwarded("ex-second");
    again.authorization_ticket = TicketClaims {
        req: signed,
        ..ticket_claims(&broker, TRUST_DOMAIN, "civil-register", &again)
    }
    .sign(&broker)
    .expect("sign");
    let status = client
        .provide_evidence(again)
        .await
        .expect_err("one signature, a second exchange");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(
        reason_of(&status),
        Some(ErrorReason::SignedRequestInvalid),
        "{status:?}"
    );
    assert!(status.message().contains("ex-first"), "{status:?}");
    assert_eq!(counts.started.load(Ordering::SeqCst), 2);
}

/// The one record of `request_id`.
async fn record_of(world: &World, request_id: &str) -> onceonly_proto::v1::AuditRecord {
    world.settle().await;
    let records = world.wait_for_records(request_id, 1, PATIENCE).await;
    assert_eq!(records.len(), 1, "{request_id}: {records:?}");
    records.into_iter().next().expect("one")
}

#[tokio::test]
async fn the_broker_checks_the_signed_request_first_and_records_its_digest() {
    let world = World::start().await;
    let berlin = signer(&world.pki, Role::Authority, BERLIN);
    let muenchen = signer(&world.pki, Role::Authority, MUENCHEN);
    let mut plain = world.authority_unsigned(BERLIN);
    let lifetime = onceonly_seal::request::DEFAULT_LIFETIME;

    // Signed: delivered, and the record keeps the token's digest.
    let mut request = birth_certificate("signed-ok");
    let signed = sign_request(&mut request, &berlin, lifetime).expect("sign");
    plain.request_evidence(request).await.expect("evidence");
    let record = record_of(&world, "signed-ok").await;
    assert_eq!(
        record.signed_request_sha256,
        Sha256::digest(onceonly_seal::request::signing_input(&signed.token)).to_vec()
    );

    // Not signed, where the policy requires it (the default).
    let status = plain
        .request_evidence(birth_certificate("unsigned"))
        .await
        .expect_err("unsigned");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(reason_of(&status), Some(ErrorReason::SignedRequestMissing));

    // A field changed after signing: the claim and the field are named.
    let mut request = birth_certificate("changed");
    sign_request(&mut request, &berlin, lifetime).expect("sign");
    request.purpose = "vehicle-tax-assessment".into();
    let status = plain.request_evidence(request).await.expect_err("changed");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason_of(&status), Some(ErrorReason::SignedRequestMismatch));
    assert_eq!(violated_fields(&status), vec!["signed_request"]);
    assert!(status.message().contains("pur"), "{status:?}");

    // The token edited, its signature kept.
    let mut request = birth_certificate("edited");
    sign_request(&mut request, &berlin, lifetime).expect("sign");
    request.signed_request = edited(&request.signed_request, |c| c.lgb = "none".into());
    request.legal_basis = "none".into();
    let status = plain.request_evidence(request).await.expect_err("edited");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(reason_of(&status), Some(ErrorReason::SignedRequestInvalid));
    assert!(status.message().contains("signature"), "{status:?}");

    // München's signature, sent over Berlin's connection.
    let mut request = birth_certificate("other-signer");
    sign_request(&mut request, &muenchen, lifetime).expect("sign");
    let status = plain
        .request_evidence(request)
        .await
        .expect_err("another authority's signature");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(reason_of(&status), Some(ErrorReason::SignedRequestInvalid));
    assert!(status.message().contains(MUENCHEN), "{status:?}");

    // Expired.
    let mut request = birth_certificate("expired");
    let now = onceonly_seal::unix_now();
    let claims = RequestClaims {
        iat: now - 900,
        exp: now - 600,
        ..RequestClaims::for_request(&request, &berlin.participant().spiffe_id(), now, lifetime)
            .expect("claims")
    };
    request.signed_request = claims.sign(&berlin).expect("sign");
    let status = plain.request_evidence(request).await.expect_err("expired");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(reason_of(&status), Some(ErrorReason::SignedRequestInvalid));

    // Each refusal is recorded, none reached a register.
    for (request_id, outcome) in [
        ("unsigned", ExchangeOutcome::Denied),
        ("changed", ExchangeOutcome::Rejected),
        ("edited", ExchangeOutcome::Denied),
        ("other-signer", ExchangeOutcome::Denied),
        ("expired", ExchangeOutcome::Denied),
    ] {
        let record = record_of(&world, request_id).await;
        assert_eq!(record.outcome(), outcome, "{request_id}");
        assert!(!record.register_contacted, "{request_id}");
        assert!(record.signed_request_sha256.is_empty(), "{request_id}");
    }
}

#[tokio::test]
async fn old_evidence_passed_off_as_the_answer_to_a_new_request_is_refused_by_the_authority() {
    let world = World::start().await;
    let mut berlin = world.authority(BERLIN);
    let trust = Arc::new(
        identity_verifier(&world.pki.tls_files(Role::Authority, BERLIN), TRUST_DOMAIN)
            .expect("trust"),
    );
    let opener = EvidenceOpener::new(trust, None);
    let expected = |exchange_id: &'static str| Expected {
        exchange_id,
        evidence_type: "birth-certificate",
        subject_scheme: SubjectIdScheme::DeIdnr,
        subject_value: ANNA,
        requester: "spiffe://onceonly.test/authority/elterngeld-berlin",
        parameters: None,
        connector: Some("civil-register"),
        encrypted: false,
        request: None,
    };

    // The first request, answered and opened.
    let (answer, first) = berlin.request_signed(birth_certificate("first")).await;
    let first = first.expect("signed");
    let answer = answer.expect("evidence").into_inner();
    let old = answer.evidence.expect("evidence");
    let exchange: &'static str = Box::leak(answer.exchange_id.into_boxed_str());
    opener
        .open(
            &old,
            &Expected {
                request: Some(first.binding()),
                ..expected(exchange)
            },
        )
        .expect("the answer to the first request opens");

    // A second request: a broker answering it with the first evidence
    // (and the first exchange id, which it chooses) is caught.
    let mut second = birth_certificate("second");
    let signer = signer(&world.pki, Role::Authority, BERLIN);
    let second = sign_request(
        &mut second,
        &signer,
        onceonly_seal::request::DEFAULT_LIFETIME,
    )
    .expect("sign");
    let refused = opener
        .open(
            &old,
            &Expected {
                request: Some(second.binding()),
                ..expected(exchange)
            },
        )
        .expect_err("old evidence for a new request");
    assert_eq!(
        refused,
        OpenError::Binding {
            field: "request nonce (non)"
        }
    );

    // Evidence older than the authority accepts is refused whatever it is
    // bound to.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let refused = EvidenceOpener::new(
        Arc::new(
            identity_verifier(&world.pki.tls_files(Role::Authority, BERLIN), TRUST_DOMAIN)
                .expect("trust"),
        ),
        None,
    )
    .with_max_age(Duration::from_secs(1))
    .open(
        &old,
        &Expected {
            request: Some(first.binding()),
            ..expected(exchange)
        },
    )
    .expect_err("too old");
    assert!(
        matches!(refused, OpenError::Stale(_)),
        "{refused:?}: {refused}"
    );
}

#[tokio::test]
async fn an_authority_the_policy_lets_send_unsigned_still_meets_the_registers_rule() {
    let world = World::start().await;
    let policy = std::fs::read_to_string(world.policy_path()).expect("policy");
    // An unknown group is refused with the file, the line and the fix.
    let broken = format!("{policy}\n[signed_requests]\nunsigned_allowed = [\"group:nobody\"]\n");
    let path = world.dir.path().join("broken-policy.toml");
    std::fs::write(&path, &broken).expect("write");
    let routing =
        onceonly_broker::routing::RoutingTable::load(&world.dir.path().join("routing.toml"))
            .expect("routing");
    let error = onceonly_broker::policy::Policy::parse(&path, &broken, &routing)
        .expect_err("unknown group")
        .to_string();
    assert!(
        error.contains("broken-policy.toml")
            && error.contains("signed_requests.unsigned_allowed")
            && error.contains("line")
            && error.contains("[groups]"),
        "{error}"
    );

    let allowing = format!("{policy}\n[signed_requests]\nunsigned_allowed = [\"{BERLIN}\"]\n");
    let parsed =
        onceonly_broker::policy::Policy::parse(&path, &allowing, &routing).expect("parses");
    assert!(!parsed.requires_signed_requests(BERLIN));
    assert!(parsed.requires_signed_requests(MUENCHEN));
    std::fs::write(world.policy_path(), allowing).expect("write");
    // Reloaded now (as SIGHUP does), not at the watcher's next look.
    world
        .running_broker()
        .broker()
        .expect("running")
        .policy
        .reload()
        .expect("the edited policy loads");
    let status = world
        .authority_unsigned(BERLIN)
        .request_evidence(birth_certificate("unsigned-allowed"))
        .await
        .expect_err("the register refuses it");
    // Past the broker, but the register answers only signed requests.
    assert!(
        status.message().contains("not signed by the authority"),
        "{status:?}"
    );
    // Another authority still must sign.
    let status = world
        .authority_unsigned(MUENCHEN)
        .request_evidence(RequestEvidenceRequest {
            request_id: "muenchen-unsigned".into(),
            ..birth_certificate("x")
        })
        .await
        .expect_err("München must sign");
    assert_eq!(reason_of(&status), Some(ErrorReason::SignedRequestMissing));
}

#[tokio::test]
async fn a_failed_exchange_frees_its_signed_request_for_the_retry_and_only_listed_authorities_go_unsigned()
 {
    let pki = pki_with(&[
        (Role::Connector, "civil-register"),
        (Role::Authority, BERLIN),
        (Role::Authority, MUENCHEN),
    ]);
    // The civil register, answering Berlin's tickets without a signed
    // request (its operator listed Berlin), nobody else's.
    let civil = onceonly_connector_sdk::ConnectorServer::builder(
        onceonly_registry_mock::MockRegister::embedded(onceonly_registry_mock::RegisterKind::Civil)
            .expect("civil register"),
        pki.tls_files(Role::Connector, "civil-register"),
    )
    .allowed_broker("broker")
    .accept_unsigned_from(&[BERLIN])
    .listen(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
    .bind()
    .await
    .expect("binds")
    .spawn();
    let broker = signer(&pki, Role::Broker, "broker");
    let mut client = ConnectorServiceClient::new(channel_as(
        &pki,
        Role::Broker,
        "broker",
        civil.local_addr(),
        None,
    ));
    let ticket = |request: &ProvideEvidenceRequest, req: String| {
        TicketClaims {
            req,
            ..ticket_claims(&broker, TRUST_DOMAIN, "civil-register", request)
        }
        .sign(&broker)
        .expect("sign")
    };

    // A subject the register does not hold: NOT_FOUND, no evidence, and
    // the same signed request may be retried under a new exchange.
    let mut nobody = forwarded("ex-nobody-1");
    nobody.subject = Some(SubjectId {
        scheme: SubjectIdScheme::DeIdnr.into(),
        value: "86095742719".into(),
    });
    let signed = ticket_with_request(&pki, &broker, "civil-register", &nobody).req;
    for exchange in ["ex-nobody-1", "ex-nobody-2"] {
        let mut request = ProvideEvidenceRequest {
            exchange_id: exchange.into(),
            ..nobody.clone()
        };
        request.authorization_ticket = ticket(&request, signed.clone());
        let status = client
            .provide_evidence(request)
            .await
            .expect_err("not held");
        assert_eq!(status.code(), Code::NotFound, "{exchange}: {status:?}");
    }

    // The consent the authority named must be the one the ticket names.
    let mut request = forwarded("ex-consent");
    let claims = RequestClaims {
        cid: "consent-the-authority-named".into(),
        ..RequestClaims::for_forwarded(
            &request,
            "r",
            onceonly_seal::unix_now(),
            onceonly_seal::request::DEFAULT_LIFETIME,
        )
        .expect("claims")
    };
    request.authorization_ticket = TicketClaims {
        req: claims
            .sign(&signer(&pki, Role::Authority, BERLIN))
            .expect("sign"),
        cid: "another-consent".into(),
        ..ticket_claims(&broker, TRUST_DOMAIN, "civil-register", &request)
    }
    .sign(&broker)
    .expect("sign");
    let status = client
        .provide_evidence(request)
        .await
        .expect_err("another consent");
    assert_eq!(
        reason_of(&status),
        Some(ErrorReason::SignedRequestMismatch),
        "{status:?}"
    );

    // Unsigned: answered for Berlin, listed; refused for München.
    let mut berlin = forwarded("ex-unsigned-berlin");
    berlin.authorization_ticket = ticket(&berlin, String::new());
    client
        .provide_evidence(berlin)
        .await
        .expect("Berlin is listed");
    let mut muenchen = forwarded("ex-unsigned-muenchen");
    muenchen.requester_id = format!("spiffe://{TRUST_DOMAIN}/authority/{MUENCHEN}");
    muenchen.authorization_ticket = ticket(&muenchen, String::new());
    let status = client
        .provide_evidence(muenchen)
        .await
        .expect_err("München is not");
    assert_eq!(
        reason_of(&status),
        Some(ErrorReason::SignedRequestMissing),
        "{status:?}"
    );
}
