//! A running installation (broker, registers) that admits the bridge: its
//! certificates issued, the policy's rule for it in force.

use onceonly_certs::identity::Role;
use onceonly_certs::pki::IssueOptions;
use onceonly_integration_tests::world::{SAMPLE_POLICY, World};

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
