//! A running installation (broker, registers) that admits the bridge: its
//! certificates issued, the policy's rule for it in force.

use std::sync::Arc;
use std::time::Duration;

use onceonly_certs::identity::Role;
use onceonly_certs::pki::IssueOptions;
use onceonly_integration_tests::world::{SAMPLE_POLICY, World};
use onceonly_oots_bridge::bridge::Bridge;
use onceonly_oots_bridge::broker::BrokerSource;
use onceonly_oots_bridge::mapping::Mapping;
use onceonly_oots_bridge::transport::domibus::DomibusWs;
use onceonly_seal::{DecryptionKey, EvidenceOpener, Signer};

use super::{CLASSIFICATION, provider};

/// The bridge's authority id.
pub const BRIDGE: &str = "oots-bridge";
/// The legal basis it asks under.
pub const LEGAL_BASIS: &str = "Art. 14 Abs. 1 VO (EU) 2018/1724";

/// Issues the bridge's certificates (TLS and encryption) and puts in
/// force the rule that lets it fetch birth certificates for procedure T1
/// only.
pub fn admit_bridge(world: &World) {
    let rule = format!(
        r#"
[[rule]]
id = "oots-t1-birth-certificate"
callers = ["{BRIDGE}"]
evidence_types = ["birth-certificate"]
purposes = ["oots:T1"]
legal_bases = ["{LEGAL_BASIS}"]
consent = "not-required"
"#
    );
    std::fs::write(world.policy_path(), format!("{SAMPLE_POLICY}{rule}")).expect("policy");
    world
        .running_broker()
        .broker()
        .expect("running")
        .policy
        .reload_by("the test")
        .expect("the policy with the bridge's rule");
    world
        .pki
        .issue(&IssueOptions::new(Role::Authority, BRIDGE))
        .expect("the bridge's certificate");
    let mut encryption = IssueOptions::new(Role::Authority, BRIDGE);
    encryption.encryption = true;
    world
        .pki
        .issue(&encryption)
        .expect("its encryption certificate");
}

/// The bridge in front of `world`'s broker, answering the access point at
/// `endpoint`, with `more` added to its one mapping entry (e.g.
/// `preview = true`).
pub fn bridge_for(
    world: &World,
    dir: &std::path::Path,
    endpoint: &str,
    more: &str,
) -> Bridge<DomibusWs, BrokerSource> {
    admit_bridge(world);
    let pki = &world.pki;
    let (cert, key) = pki.participant_paths(Role::Authority, BRIDGE);
    let (enc_cert, enc_key) = pki.encryption_paths(BRIDGE);
    let opener = EvidenceOpener::new(
        Arc::new(
            onceonly_certs::tls::identity_verifier(
                &pki.tls_files(Role::Authority, BRIDGE),
                "onceonly.test",
            )
            .expect("verifier"),
        ),
        Some(DecryptionKey::from_files(&enc_cert, &enc_key).expect("decryption key")),
    );
    let certificate = onceonly_certs::pki::load_certs(&enc_cert)
        .expect("cert")
        .remove(0)
        .as_ref()
        .to_vec();
    let channel = onceonly_integration_tests::channel_as(
        pki,
        Role::Authority,
        BRIDGE,
        world.broker_addr(),
        None,
    );
    let source = BrokerSource::new(
        channel,
        Arc::new(Signer::from_files(&cert, &key).expect("signer")),
        Arc::new(opener),
        certificate,
        Duration::from_secs(10),
    );
    let mapping_path = dir.join("mapping.toml");
    std::fs::write(
        &mapping_path,
        format!(
            r#"
[[evidence]]
classification = "{CLASSIFICATION}"
procedures = ["T1", "T2"]
evidence_type = "birth-certificate"
legal_basis = "{LEGAL_BASIS}"
format = "application/xml"
{more}
"#
        ),
    )
    .expect("mapping");
    Bridge::new(
        DomibusWs::new(endpoint.parse().expect("uri")),
        source,
        Mapping::load(&mapping_path).expect("mapping"),
        provider(),
    )
}
