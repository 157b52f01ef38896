//! The mutual TLS plumbing over a real socket: a tonic server fed by
//! `MtlsIncoming`, clients through `MtlsConnector`.

use std::sync::Arc;
use std::time::Duration;

use onceonly_certs::tls::{self, ConnectError, ReloadableServerTls};
use onceonly_certs::{MtlsConnector, MtlsIncoming, Pki, Role};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

async fn serve(pki: &Pki) -> (std::net::SocketAddr, Arc<ReloadableServerTls>) {
    let server_tls = ReloadableServerTls::load(pki.tls_files(Role::Broker, "broker")).expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_reporter, health) = tonic_health::server::health_reporter();
    let incoming = MtlsIncoming::new(
        listener,
        server_tls.clone(),
        onceonly_certs::ConnectionLimits::default(),
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(incoming),
    );
    (addr, server_tls)
}

/// The serial of participant (`role`, `id`)'s certificate.
fn serial_of(pki: &Pki, role: Role, id: &str) -> String {
    onceonly_certs::inspect::CertificateSummary::of(
        &onceonly_certs::pki::load_certs(&pki.participant_paths(role, id).0).expect("c")[0],
    )
    .expect("summary")
    .serial
}

async fn health_check(
    pki: &Pki,
    role: Role,
    id: &str,
    addr: std::net::SocketAddr,
    expect_server: Option<onceonly_certs::Participant>,
) -> Result<(), tonic::Status> {
    let (config, _) = tls::client_config(&pki.tls_files(role, id)).expect("client tls");
    let channel = MtlsConnector::new(config, expect_server)
        .channel(&addr.to_string(), Duration::from_secs(5))
        .expect("channel");
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn valid_client_is_served_and_revoked_one_refused_after_live_reload() {
    let pki = Pki::throwaway(
        "onceonly.test",
        &[(Role::Authority, "a"), (Role::Authority, "b")],
    )
    .expect("pki");
    let (addr, server_tls) = serve(&pki).await;
    let broker = pki.participant(Role::Broker, "broker").expect("id");

    health_check(&pki, Role::Authority, "a", addr, Some(broker.clone()))
        .await
        .expect("a is served");

    let serial = serial_of(&pki, Role::Authority, "a");
    pki.revoke(&serial).expect("revoke");
    // Before the reload the server still uses the old list...
    health_check(&pki, Role::Authority, "a", addr, None)
        .await
        .expect("old CRL still in force");
    // ...after it, a new connection with the revoked certificate fails.
    server_tls.reload().expect("reload");
    let refused = health_check(&pki, Role::Authority, "a", addr, None)
        .await
        .expect_err("revoked client was served");
    assert_tls_alert(&refused, "CertificateRevoked");
    health_check(&pki, Role::Authority, "b", addr, None)
        .await
        .expect("b is still served");
}

#[tokio::test]
async fn client_from_a_foreign_ca_is_refused() {
    let pki = Pki::throwaway("onceonly.test", &[]).expect("pki");
    let foreign = Pki::throwaway("onceonly.test", &[(Role::Authority, "x")]).expect("pki");
    let (addr, _) = serve(&pki).await;
    // The foreign client trusts our CA (it has our ca.pem) but its own
    // certificate is from another CA.
    let mut files = foreign.tls_files(Role::Authority, "x");
    files.ca = pki.ca_cert_path();
    files.crl = Some(pki.crl_path());
    let (config, _) = tls::client_config(&files).expect("tls");
    let channel = MtlsConnector::new(config, None)
        .channel(&addr.to_string(), Duration::from_secs(5))
        .expect("channel");
    let result = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect_err("foreign client was served");
    // Same trust-domain name, other CA: the issuer is found by name and its
    // signature fails to verify.
    assert_tls_alert(&result, "DecryptError");
}

/// In TLS 1.3 the server judges the client's certificate after the client
/// has finished its side of the handshake, so the refusal reaches the client
/// as the server's fatal alert, whose name says why.
fn assert_tls_alert(status: &tonic::Status, alert: &str) {
    // UNAVAILABLE or UNKNOWN: tonic reports a connection that fails under
    // a call either way, depending on which side notices first.
    assert!(
        matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown
        ),
        "{status:?}"
    );
    let detail = format!("{status:?}");
    assert!(
        detail.contains(&format!("received fatal alert: {alert}")),
        "not the {alert} alert: {detail}"
    );
}

#[tokio::test]
async fn server_with_unexpected_identity_is_refused_by_the_client() {
    let pki = Pki::throwaway("onceonly.test", &[(Role::Authority, "a")]).expect("pki");
    let (addr, _) = serve(&pki).await;
    let expected = pki
        .participant(Role::Connector, "civil-register")
        .expect("id");
    let (config, _) = tls::client_config(&pki.tls_files(Role::Authority, "a")).expect("tls");
    let channel = MtlsConnector::new(config, Some(expected))
        .channel(&addr.to_string(), Duration::from_secs(5))
        .expect("channel");
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect_err("mismatched server accepted");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let source = std::error::Error::source(&status).expect("status has a source");
    let found = tls::find_connect_error(source).expect("connect error in chain");
    assert!(
        matches!(found, ConnectError::IdentityMismatch { found, .. } if found.ends_with("/broker/broker")),
        "{found:?}"
    );
}

/// Issue 24: a revocation list must be issued and signed by the trust
/// domain's CA. Another CA's list matches no certificate, so it would turn
/// revocation off while looking current: refused at start, and on reload
/// (the list in force stays, and a revoked client stays out).
#[tokio::test]
async fn a_revocation_list_of_another_ca_is_refused_at_start_and_on_reload() {
    let pki = Pki::throwaway("onceonly.test", &[(Role::Authority, "a")]).expect("pki");
    // Another CA of the same name (only its key differs), and one of
    // another trust domain.
    let impostor = Pki::throwaway("onceonly.test", &[]).expect("impostor pki");
    let foreign = Pki::throwaway("elsewhere.test", &[]).expect("foreign pki");
    let (addr, server_tls) = serve(&pki).await;
    let serial = serial_of(&pki, Role::Authority, "a");
    pki.revoke(&serial).expect("revoke");
    server_tls.reload().expect("reload with our own list");
    health_check(&pki, Role::Authority, "a", addr, None)
        .await
        .expect_err("revoked client was served");

    let ours = std::fs::read(pki.crl_path()).expect("our list");
    let kept_dir = tempfile::tempdir().expect("tempdir");
    let kept = kept_dir.path().join("ours.pem");
    std::fs::write(&kept, &ours).expect("keep our list");
    for (other, why) in [
        (
            &impostor,
            "its signature does not verify with that CA's key",
        ),
        (&foreign, "not by this trust domain's CA"),
    ] {
        // The other CA's (empty) list pushed in place of ours.
        std::fs::copy(other.crl_path(), pki.crl_path()).expect("push the other list");
        let refused = server_tls
            .reload()
            .expect_err("another CA's list was taken");
        let message = refused.to_string();
        assert!(
            message.contains(why) && message.contains("refresh-crl"),
            "{message}"
        );
        // The client keeps our list (its own check would refuse the
        // other one too).
        let mut files = pki.tls_files(Role::Authority, "a");
        files.crl = Some(kept.clone());
        let (config, _) = tls::client_config(&files).expect("client tls");
        let still = HealthClient::new(
            MtlsConnector::new(config, None)
                .channel(&addr.to_string(), Duration::from_secs(5))
                .expect("channel"),
        )
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect_err("the revoked client got in after another CA's list");
        assert_tls_alert(&still, "CertificateRevoked");
        let Err(at_start) = ReloadableServerTls::load(pki.tls_files(Role::Broker, "broker")) else {
            panic!("a server started on another CA's list");
        };
        assert!(at_start.to_string().contains(why), "{at_start}");
    }
    std::fs::write(pki.crl_path(), ours).expect("our list back");
    server_tls.reload().expect("our own list reloads");
}

#[tokio::test]
async fn an_older_revocation_list_pushed_back_is_refused_and_the_revoked_stay_out() {
    let pki = Pki::throwaway(
        "onceonly.test",
        &[(Role::Authority, "a"), (Role::Authority, "b")],
    )
    .expect("pki");
    let record = tempfile::tempdir().expect("dir");
    let number_file = record.path().join("state").join("crl-number");
    let mut files = pki.tls_files(Role::Broker, "broker");
    files.crl_number_file = Some(number_file.clone());
    let before_revocation = std::fs::read(pki.crl_path()).expect("crl");

    let server_tls = ReloadableServerTls::load(files.clone()).expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let incoming = MtlsIncoming::new(listener, server_tls.clone(), Default::default());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(tonic_health::server::health_reporter().1)
            .serve_with_incoming(incoming),
    );

    // "a" is revoked, and the newer list is in force.
    pki.revoke(&serial_of(&pki, Role::Authority, "a"))
        .expect("revoke");
    server_tls.reload().expect("the newer list loads");
    let (_, number) = pki.revoked_serials().expect("crl");
    assert_eq!(
        std::fs::read_to_string(&number_file)
            .expect("recorded")
            .trim(),
        number.to_string(),
        "the highest number is recorded"
    );
    assert_tls_alert(
        &health_check(&pki, Role::Authority, "a", addr, None)
            .await
            .expect_err("revoked"),
        "CertificateRevoked",
    );

    // The list from before the revocation, pushed back: refused loudly,
    // the newer stays in force, "a" stays out. (The clients below keep the
    // newer list: this process would refuse them the older one too.)
    let newer = record.path().join("newer-crl.pem");
    std::fs::copy(pki.crl_path(), &newer).expect("keep the newer list");
    std::fs::write(pki.crl_path(), &before_revocation).expect("push back");
    let refused = server_tls.reload().expect_err("an older list");
    let message = refused.to_string();
    assert!(
        message.contains("older than number")
            && message.contains(&pki.crl_path().display().to_string())
            && message.contains("refresh-crl"),
        "{message}"
    );
    let client = |id: &str| {
        let mut files = pki.tls_files(Role::Authority, id);
        files.crl = Some(newer.clone());
        let (config, _) = tls::client_config(&files).expect("client tls");
        let channel = MtlsConnector::new(config, None)
            .channel(&addr.to_string(), Duration::from_secs(5))
            .expect("channel");
        HealthClient::new(channel)
    };
    assert_tls_alert(
        &client("a")
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect_err("still revoked"),
        "CertificateRevoked",
    );
    client("b")
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("b is served");

    // Started on the older list, where it is the only one: every peer is
    // refused, and the state says why, until a newer list is loaded.
    let restarted = ReloadableServerTls::load(files.clone()).expect("starts");
    assert_eq!(
        restarted.crl_state(),
        onceonly_certs::identity::CrlState::RolledBack
    );
    let b = pki.participant_paths(Role::Authority, "b").0;
    let b = onceonly_certs::pki::load_certs(&b).expect("cert");
    let refused = restarted
        .verifier()
        .verify(&b[0], &[])
        .expect_err("nobody while rolled back");
    assert_eq!(
        refused.refusal_kind(),
        onceonly_certs::security::RefusalKind::CrlStale
    );
    assert!(
        refused.to_string().contains("older than number"),
        "{refused}"
    );
    std::fs::copy(&newer, pki.crl_path()).expect("the newer list again");
    restarted.reload().expect("the newer list loads");
    restarted.verifier().verify(&b[0], &[]).expect("b again");

    // A garbled record is named, not taken for zero.
    std::fs::write(&number_file, "many").expect("garble");
    let error = onceonly_certs::pki::check_crl_number(
        &pki.crl_path(),
        &before_revocation,
        &onceonly_certs::pki::load_certs(&pki.ca_cert_path()).expect("ca"),
        Some(&number_file),
    )
    .expect_err("garbled")
    .to_string();
    assert!(error.contains("not a CRL number"), "{error}");
}

#[tokio::test]
async fn an_open_connection_is_closed_once_its_peers_certificate_expires() {
    let pki = Pki::throwaway("onceonly.test", &[]).expect("pki");
    let mut short = onceonly_certs::IssueOptions::new(Role::Authority, "short-lived");
    short.not_before = Some(time::OffsetDateTime::now_utc() - time::Duration::seconds(5));
    short.validity = Duration::from_secs(9);
    pki.issue(&short)
        .expect("a certificate valid for a few seconds more");
    let (addr, server_tls) = serve(&pki).await;
    let closer = tokio::spawn(tls::close_on_expiry(Arc::downgrade(&server_tls)));

    let (config, _) =
        tls::client_config(&pki.tls_files(Role::Authority, "short-lived")).expect("client tls");
    let channel = MtlsConnector::new(config, None)
        .channel(&addr.to_string(), Duration::from_secs(5))
        .expect("channel");
    let mut client = HealthClient::new(channel);
    let ask = || HealthCheckRequest {
        service: String::new(),
    };
    client.check(ask()).await.expect("served while valid");
    assert_eq!(server_tls.open_connection_count(), 1);
    // Past its notAfter (whole seconds) and the closer's next look: the
    // connection is gone, without a reload or a call to notice it. (Calls
    // on it were refused from its notAfter on already, by every service
    // that asks for the peer's identity.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while server_tls.open_connection_count() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connection outlived its certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cert =
        onceonly_certs::pki::load_certs(&pki.participant_paths(Role::Authority, "short-lived").0)
            .expect("cert");
    let (_, parsed) = x509_parser::parse_x509_certificate(cert[0].as_ref()).expect("parses");
    assert!(
        time::OffsetDateTime::now_utc().unix_timestamp() >= parsed.validity().not_after.timestamp(),
        "closed before it expired"
    );
    closer.abort();
}
