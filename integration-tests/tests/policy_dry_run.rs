//! `onceonly-policy dry-run` over a log of several hundred real exchanges
//! through a running broker: a change that takes an authority out of a
//! rule lists exactly its decisions under that rule, a change that changes
//! nothing lists none.

use std::collections::{BTreeMap, BTreeSet};

use onceonly_integration_tests::binary;
use onceonly_integration_tests::world::{AUTHORITIES, SAMPLE_POLICY, World, birth_certificate};
use onceonly_policy::dry_run::{Outcome, Window, replay};

const BERLIN: &str = AUTHORITIES[0];
const MUENCHEN: &str = AUTHORITIES[1];
const KOELN: &str = AUTHORITIES[2];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_over_hundreds_of_real_exchanges_lists_exactly_what_a_change_refuses() {
    let world = World::start().await;
    let mut asked = Vec::new();
    for n in 0..100 {
        for authority in [BERLIN, MUENCHEN] {
            let id = format!("{authority}-{n}");
            world
                .authority(authority)
                .request_evidence(birth_certificate(&id))
                .await
                .expect("allowed");
            asked.push(id);
        }
        // Köln has no rule for birth certificates: refused by the policy.
        let id = format!("{KOELN}-{n}");
        world
            .authority(KOELN)
            .request_evidence(birth_certificate(&id))
            .await
            .expect_err("no rule");
        asked.push(id);
    }
    // Unsigned: refused before the policy looks, so not replayed.
    world
        .authority_unsigned(BERLIN)
        .request_evidence(birth_certificate("unsigned"))
        .await
        .expect_err("unsigned");
    world.settle().await;
    let records = world
        .wait_for_records("unsigned", 1, std::time::Duration::from_secs(30))
        .await;
    assert_eq!(records.len(), 1);

    let data_dir = world.dir.path().join("data");
    let mut logged = Vec::new();
    onceonly_audit_log::verify::read_dir_records(&data_dir, |index, record| {
        logged.push((index, record));
    })
    .expect("the log reads");
    let request_of: BTreeMap<u64, String> = logged
        .iter()
        .map(|(index, record)| (*index, record.request_id.clone()))
        .collect();
    let routing =
        onceonly_broker::routing::RoutingTable::load(&world.dir.path().join("routing.toml"))
            .expect("routing");
    let parse = |text: &str| {
        onceonly_broker::policy::Policy::parse(std::path::Path::new("edited.toml"), text, &routing)
            .expect("policy")
    };

    // München out of the parental allowance offices.
    let edited = SAMPLE_POLICY.replace(
        r#"family-benefits = ["elterngeld-berlin", "elterngeld-muenchen"]"#,
        r#"family-benefits = ["elterngeld-berlin"]"#,
    );
    assert_ne!(edited, SAMPLE_POLICY, "the sample policy's group changed");
    let report = replay(logged.clone(), &parse(&edited), &Window::default());
    assert_eq!(report.replayed, 300, "every decided exchange");
    let refused: BTreeSet<String> = report
        .changed
        .iter()
        .map(|c| request_of[&c.index].clone())
        .collect();
    let muenchens: BTreeSet<String> = asked
        .iter()
        .filter(|id| id.starts_with(MUENCHEN))
        .cloned()
        .collect();
    assert_eq!(refused, muenchens, "exactly München's 100 decisions");
    assert!(report.changed.iter().all(|c| {
        c.before
            == Outcome::Allowed {
                rule: "parental-allowance-birth-certificate".into(),
            }
            && c.after == Outcome::RefusedNoRule
            && c.caller == MUENCHEN
    }));
    assert_eq!(
        report.by_rule()[&(
            "parental-allowance-birth-certificate".to_owned(),
            "allowed -> refused"
        )],
        100
    );

    // A change of comments and order of keys only: nothing changes.
    let reworded = SAMPLE_POLICY.replace(
        "# Parental allowance offices",
        "# The parental allowance offices",
    );
    let report = replay(logged, &parse(&reworded), &Window::default());
    assert_eq!((report.replayed, report.changed.len()), (300, 0));

    // The binary, as policy staff run it, reading the data directory.
    let file = world.dir.path().join("edited-policy.toml");
    std::fs::write(&file, &edited).expect("write");
    let output = std::process::Command::new(binary("onceonly-policy", "onceonly-policy"))
        .arg("dry-run")
        .arg(&file)
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--routing")
        .arg(world.dir.path().join("routing.toml"))
        .output()
        .expect("runs");
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(table.contains("replayed 300 decision(s)"), "{table}");
    assert!(table.contains("100 would change"), "{table}");
    assert!(
        table.contains("rule \"parental-allowance-birth-certificate\": 100 allowed -> refused"),
        "{table}"
    );
    assert!(
        !table.contains("82281866209"),
        "subjects only as pseudonyms: {table}"
    );

    // The same, asked of the broker through the auditor's API.
    let output = std::process::Command::new(binary("onceonly-policy", "onceonly-policy"))
        .arg("dry-run")
        .arg(&file)
        .arg("--broker")
        .arg(world.broker_addr().to_string())
        .arg("--pki")
        .arg(world.pki.dir())
        .args(["--id", onceonly_integration_tests::world::AUDITOR])
        .arg("--routing")
        .arg(world.dir.path().join("routing.toml"))
        .output()
        .expect("runs");
    let over_api = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{over_api}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(over_api.contains("replayed 300 decision(s)"), "{over_api}");
    assert!(over_api.contains("100 would change"), "{over_api}");
}
