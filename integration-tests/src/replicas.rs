//! Broker replicas on PostgreSQL, for the tests that run them (issue 15,
//! and the intruder tests of issue 23): a server of the test's own, an
//! installation whose broker stores its state there, the database as an
//! intruder reaches it, and the consent-bound request the tests make.

use std::net::SocketAddr;

use onceonly_broker::RunningBroker;
use onceonly_certs::Role;
use onceonly_proto::v1::consent_service_client::ConsentServiceClient;
use onceonly_proto::v1::{Consent, GrantConsentRequest, RequestEvidenceRequest};

use crate::postgres::TestPostgres;
use crate::world::{BrokerSettings, PORTAL, World, anna};

/// The replicas' merge delay: long enough for a failover on a loaded
/// 2-core machine; the sequencer runs every 100 ms and a lease lasts 1 s.
pub const MERGE_DELAY_MS: u64 = 4_000;

/// A PostgreSQL server, an installation whose broker is replica 0, and
/// `extra` more replicas.
pub async fn replicas(extra: usize) -> (TestPostgres, World, Vec<RunningBroker>) {
    let postgres = tokio::task::spawn_blocking(TestPostgres::start)
        .await
        .expect("join")
        .expect("PostgreSQL starts");
    let world = World::start_with(BrokerSettings {
        sections: format!(
            "[storage]\nbackend = \"postgres\"\nurl = \"{}\"\nmerge_delay = \"{MERGE_DELAY_MS}ms\"\nsequencer_lease = \"1s\"\nsequencer_interval = \"100ms\"\ntimeout = \"2s\"\n",
            postgres.url("postgres")
        ),
        ..Default::default()
    })
    .await;
    let mut others = Vec::new();
    for n in 1..=extra {
        others.push(world.start_replica(n).await);
    }
    (postgres, world, others)
}

/// The replicas' database, as anyone with its address reaches it (an
/// intruder, an operator): plaintext, no replica's keys.
pub async fn database(postgres: &TestPostgres) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(&postgres.url("postgres"), tokio_postgres::NoTls)
            .await
            .expect("connects");
    tokio::spawn(connection);
    client
}

/// The portal at `addr` grants `authority` Anna's proof of residence for
/// the parental allowance, for an hour.
pub async fn grant_residence(world: &World, addr: SocketAddr, authority: &str) -> Consent {
    ConsentServiceClient::new(world.channel_to(addr, Role::Portal, PORTAL))
        .grant_consent(GrantConsentRequest {
            subject: Some(anna()),
            authority_id: format!("spiffe://onceonly.test/authority/{authority}"),
            evidence_type: "proof-of-residence".into(),
            purpose: "parental-allowance".into(),
            expires_at: Some(onceonly_proto::time::timestamp(
                onceonly_proto::time::now_ms() + 3_600_000,
            )),
        })
        .await
        .expect("the portal grants")
        .into_inner()
        .consent
        .expect("consent")
}

/// A request for Anna's proof of residence for the parental allowance
/// (bound to her consent by the sample policy).
pub fn residence(id: &str) -> RequestEvidenceRequest {
    RequestEvidenceRequest {
        request_id: id.into(),
        evidence_type: "proof-of-residence".into(),
        subject: Some(anna()),
        purpose: "parental-allowance".into(),
        legal_basis: "Art. 6 Abs. 1 lit. a DSGVO".into(),
        ..Default::default()
    }
}
