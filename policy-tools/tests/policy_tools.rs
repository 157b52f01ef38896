//! `check`, `diff` and `dry-run` on policies written here against the
//! shipped routing table, and the binary's exit codes and messages.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use onceonly_broker::policy::Policy;
use onceonly_broker::routing::RoutingTable;
use onceonly_policy::dry_run::{Outcome, Window, replay};
use onceonly_policy::lint::{self, Kind};
use onceonly_proto::v1::{AuditRecord, ErrorReason, RecordKind};

fn routing_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../broker/config/routing.toml")
}

fn policy(text: &str) -> Policy {
    let routing = RoutingTable::load(&routing_path()).expect("routing");
    Policy::parse(Path::new("policy.toml"), text, &routing).expect("policy")
}

const BASE: &str = r#"
[groups]
family-benefits = ["elterngeld-berlin", "elterngeld-muenchen"]
nobody = []

[[rule]]
id = "birth"
callers = ["group:family-benefits"]
evidence_types = ["birth-certificate"]
purposes = ["parental-allowance"]
legal_bases = ["§ 9 Abs. 1 BEEG"]
consent = "not-required"

[[rule]]
id = "residence"
callers = ["group:family-benefits"]
evidence_types = ["proof-of-residence"]
purposes = ["parental-allowance"]
legal_bases = ["Art. 6 Abs. 1 lit. a DSGVO"]
consent = "required"
"#;

/// The line of rule `id`'s `id = ...` in `text`.
fn line_of(text: &str, id: &str) -> usize {
    text.lines()
        .position(|l| l == format!("id = \"{id}\""))
        .expect("rule")
        + 1
}

#[test]
fn each_kind_of_finding_names_its_rule_and_line() {
    let text = format!(
        r#"{BASE}
[[rule]]
id = "for-nobody"
callers = ["group:nobody"]
evidence_types = ["birth-certificate"]
purposes = ["parental-allowance"]
legal_bases = ["§ 9 Abs. 1 BEEG"]
consent = "not-required"

[[rule]]
id = "berlin-birth-again"
callers = ["elterngeld-berlin"]
evidence_types = ["birth-certificate"]
purposes = ["parental-allowance"]
legal_bases = ["§ 9 Abs. 1 BEEG"]
consent = "required"

[[rule]]
id = "typo"
callers = ["elterngeld-berln"]
evidence_types = ["vehicle-registration"]
purposes = ["vehicle-tax-assessment"]
legal_bases = ["§ 1 KraftStG"]
consent = "not-required"
"#
    );
    let policy = policy(&text);
    let known: BTreeSet<String> = ["elterngeld-berlin", "elterngeld-muenchen"]
        .map(String::from)
        .into();
    let findings = lint::check(
        &policy,
        &lint::Options {
            known_authorities: Some(known),
            broad: 1,
        },
    );
    let line_of = |id: &str| line_of(&text, id);
    let found = |rule: &str, kind: Kind| {
        findings
            .iter()
            .find(|f| f.rule == rule && f.kind == kind)
            .unwrap_or_else(|| panic!("{rule} {kind:?} in {findings:#?}"))
    };
    let never = found("for-nobody", Kind::NeverMatches);
    assert_eq!(never.line, line_of("for-nobody"));
    let shadowed = found("berlin-birth-again", Kind::Shadowed);
    assert_eq!(shadowed.line, line_of("berlin-birth-again"));
    assert!(shadowed.message.contains("birth"), "{}", shadowed.message);
    let typo = found("typo", Kind::UnknownAuthority);
    assert!(
        typo.message.contains("elterngeld-berln"),
        "{}",
        typo.message
    );
    let broad = found("birth", Kind::Broad);
    assert_eq!(broad.line, line_of("birth"));
    // Nothing else: the consent rule is not shadowed (no other rule
    // decides residence), the base rules are known and not broad at 2.
    let quiet = lint::check(
        &policy,
        &lint::Options {
            known_authorities: None,
            broad: 2,
        },
    );
    assert_eq!(
        quiet
            .iter()
            .map(|f| (f.rule.as_str(), f.kind))
            .collect::<Vec<_>>(),
        vec![
            ("for-nobody", Kind::NeverMatches),
            ("berlin-birth-again", Kind::Shadowed)
        ]
    );
}

#[test]
fn a_rule_without_consent_after_one_with_is_not_shadowed() {
    // The broker takes the first rule that needs no consent before any
    // that needs one: the later rule decides.
    let text = r#"
[[rule]]
id = "with-consent"
callers = ["elterngeld-berlin"]
evidence_types = ["birth-certificate"]
purposes = ["parental-allowance"]
legal_bases = ["§ 9 Abs. 1 BEEG"]
consent = "required"

[[rule]]
id = "without"
callers = ["elterngeld-berlin"]
evidence_types = ["birth-certificate"]
purposes = ["parental-allowance"]
legal_bases = ["§ 9 Abs. 1 BEEG"]
consent = "not-required"
"#;
    let findings = lint::check(&policy(text), &lint::Options::default());
    assert_eq!(
        findings
            .iter()
            .map(|f| (f.rule.as_str(), f.kind))
            .collect::<Vec<_>>(),
        vec![("with-consent", Kind::Shadowed)]
    );
}

#[test]
fn a_diff_says_each_change_in_words() {
    let old = policy(BASE);
    let edited = BASE
        .replace(
            r#"family-benefits = ["elterngeld-berlin", "elterngeld-muenchen"]"#,
            r#"family-benefits = ["elterngeld-berlin"]"#,
        )
        .replace(r#"consent = "required""#, r#"consent = "not-required""#)
        + r#"
[[rule]]
id = "vehicle"
callers = ["kfz-steuer-koeln"]
evidence_types = ["vehicle-registration"]
purposes = ["vehicle-tax-assessment"]
legal_bases = ["§ 1 KraftStG"]
consent = "not-required"

[signed_requests]
unsigned_allowed = ["kfz-steuer-koeln"]
"#;
    let changes = onceonly_policy::diff::diff(&old, &policy(&edited));
    let all = changes.join("\n");
    let (birth, residence, vehicle) = (
        line_of(&edited, "birth"),
        line_of(&edited, "residence"),
        line_of(&edited, "vehicle"),
    );
    for expected in [
        format!(r#"rule "birth" (line {birth}) no longer allows authorities elterngeld-muenchen"#),
        format!(
            r#"rule "residence" (line {residence}) no longer allows authorities elterngeld-muenchen"#
        ),
        format!(r#"rule "residence" (line {residence}) no longer needs the subject's consent"#),
        format!(
            r#"rule "vehicle" added (line {vehicle}): kfz-steuer-koeln to ask for vehicle-registration for vehicle-tax-assessment under § 1 KraftStG, without the subject's consent"#
        ),
        "authorities that may send unsigned requests: now also kfz-steuer-koeln".to_owned(),
    ] {
        assert!(changes.contains(&expected), "{expected:?} not in\n{all}");
    }
    assert_eq!(changes.len(), 5, "{all}");
    assert!(onceonly_policy::diff::diff(&old, &policy(BASE)).is_empty());
}

fn record(index: u64, caller: &str, evidence_type: &str, outcome: &str) -> (u64, AuditRecord) {
    let (legal_basis, policy_rule, reason, consent_id) = match (evidence_type, outcome) {
        ("birth-certificate", "allowed") => {
            ("§ 9 Abs. 1 BEEG", "birth", ErrorReason::Unspecified, "")
        }
        ("birth-certificate", "denied") => ("none", "", ErrorReason::PolicyDenied, ""),
        ("proof-of-residence", "allowed") => (
            "Art. 6 Abs. 1 lit. a DSGVO",
            "residence",
            ErrorReason::Unspecified,
            "cns-1",
        ),
        ("proof-of-residence", "no-consent") => (
            "Art. 6 Abs. 1 lit. a DSGVO",
            "residence",
            ErrorReason::ConsentMissing,
            "",
        ),
        ("birth-certificate", "invalid") => {
            ("§ 9 Abs. 1 BEEG", "", ErrorReason::InvalidRequest, "")
        }
        // A consent revoked while the register answered: the record keeps
        // the consent it was allowed under, and says it went missing.
        ("proof-of-residence", "revoked-meanwhile") => (
            "Art. 6 Abs. 1 lit. a DSGVO",
            "residence",
            ErrorReason::ConsentMissing,
            "cns-2",
        ),
        // Allowed by the rule, the consent check did not finish.
        ("proof-of-residence", "consent-store-down") => (
            "Art. 6 Abs. 1 lit. a DSGVO",
            "residence",
            ErrorReason::BrokerUnavailable,
            "",
        ),
        other => panic!("{other:?}"),
    };
    (
        index,
        AuditRecord {
            log_index: index,
            caller_id: format!("spiffe://onceonly.test/authority/{caller}"),
            evidence_type: evidence_type.into(),
            purpose: "parental-allowance".into(),
            legal_basis: legal_basis.into(),
            policy_rule: policy_rule.into(),
            error_reason: reason.into(),
            consent_id: consent_id.into(),
            subject_pseudonym: vec![0xab; 32],
            kind: RecordKind::Unspecified.into(),
            ..Default::default()
        },
    )
}

#[test]
fn a_dry_run_lists_exactly_the_decisions_that_change() {
    let records = vec![
        record(0, "elterngeld-berlin", "birth-certificate", "allowed"),
        record(1, "elterngeld-muenchen", "birth-certificate", "allowed"),
        record(2, "elterngeld-muenchen", "birth-certificate", "allowed"),
        record(3, "kfz-steuer-koeln", "birth-certificate", "denied"),
        record(4, "elterngeld-muenchen", "proof-of-residence", "allowed"),
        record(5, "elterngeld-berlin", "proof-of-residence", "no-consent"),
        record(6, "elterngeld-muenchen", "birth-certificate", "invalid"),
        record(
            7,
            "elterngeld-berlin",
            "proof-of-residence",
            "revoked-meanwhile",
        ),
        record(
            8,
            "elterngeld-berlin",
            "proof-of-residence",
            "consent-store-down",
        ),
    ];
    // Unchanged: nothing changes; the one the log cannot tell is said so.
    let same = replay(records.clone(), &policy(BASE), &Window::default());
    assert_eq!(
        (
            same.replayed,
            same.skipped,
            same.changed.len(),
            same.undetermined
        ),
        (8, 1, 0, 1),
        "{:#?}",
        same.changed
    );

    // München out of the group: its allowed decisions are refused now.
    let without_muenchen = policy(&BASE.replace(
        r#"["elterngeld-berlin", "elterngeld-muenchen"]"#,
        r#"["elterngeld-berlin"]"#,
    ));
    let report = replay(records.clone(), &without_muenchen, &Window::default());
    assert_eq!(
        report.changed.iter().map(|c| c.index).collect::<Vec<_>>(),
        vec![1, 2, 4]
    );
    assert!(
        report
            .changed
            .iter()
            .all(|c| c.after == Outcome::RefusedNoRule)
    );
    let by_rule = report.by_rule();
    assert_eq!(by_rule[&("birth".to_owned(), "allowed -> refused")], 2);
    assert_eq!(by_rule[&("residence".to_owned(), "allowed -> refused")], 1);
    let table = report.table();
    assert!(table.contains("subject abababababababab"), "{table}");
    assert!(!table.contains("82281866209"), "{table}");

    // Residence without consent: the request refused for want of one is
    // allowed now; Köln's birth certificate, under its own legal basis.
    let opened = policy(&BASE.replace(r#"consent = "required""#, r#"consent = "not-required""#));
    let report = replay(records.clone(), &opened, &Window::default());
    assert_eq!(
        report
            .changed
            .iter()
            .map(|c| (c.index, c.direction()))
            .collect::<Vec<_>>(),
        vec![(5, "refused -> allowed"), (7, "refused -> allowed")]
    );

    // A window by index.
    let window = Window {
        from_index: Some(2),
        to_index: Some(4),
        ..Window::default()
    };
    let report = replay(records, &without_muenchen, &window);
    assert_eq!(report.replayed, 2);
    assert_eq!(
        report.changed.iter().map(|c| c.index).collect::<Vec<_>>(),
        vec![2]
    );
}

#[test]
fn the_binary_names_the_file_and_line_and_says_so_in_its_exit_code() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::copy(routing_path(), dir.path().join("routing.toml")).expect("routing");
    let file = dir.path().join("policy.toml");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_onceonly-policy"))
            .args(args)
            .output()
            .expect("runs")
    };
    std::fs::write(&file, BASE).expect("write");
    let clean = run(&["check", file.to_str().expect("utf-8")]);
    assert_eq!(clean.status.code(), Some(0), "{clean:?}");

    std::fs::write(
        &file,
        BASE.replace(
            "family-benefits = [\"elterngeld-berlin\", \"elterngeld-muenchen\"]",
            "family-benefits = []",
        ),
    )
    .expect("write");
    let found = run(&["check", file.to_str().expect("utf-8")]);
    assert_eq!(found.status.code(), Some(1), "{found:?}");
    let out = String::from_utf8_lossy(&found.stdout);
    assert!(
        out.contains(&format!(
            "{}:{}: rule \"birth\"",
            file.display(),
            line_of(BASE, "birth")
        )),
        "{out}"
    );

    std::fs::write(&file, BASE.replace("birth-certificate", "birth-certifcate")).expect("write");
    let broken = run(&["check", file.to_str().expect("utf-8")]);
    assert_eq!(broken.status.code(), Some(2), "{broken:?}");
    let err = String::from_utf8_lossy(&broken.stderr);
    // The rule's evidence_types line, two below its id.
    let line = format!("line {}", line_of(BASE, "birth") + 2);
    assert!(
        err.contains("policy.toml") && err.contains(&line) && err.contains("birth-certifcate"),
        "{err}"
    );
}
