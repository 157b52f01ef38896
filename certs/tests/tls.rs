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
