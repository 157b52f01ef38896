//! The console in a real headless Chromium, against a real broker: the
//! browser holds a person's client certificate in its NSS database, as at
//! a desk, and the console is served over the broker's own mutual TLS.
//!
//! - no client certificate: refused, and nothing of the console shown;
//! - an auditor finds an exchange and sees its inclusion proof verified,
//!   and checks two heads for consistency;
//! - policy staff edit the policy, see the dry run's changed decisions,
//!   apply it, and the next request is decided by it; the log entry names
//!   them;
//! - a change posted from another origin is refused, even with the
//!   person's real CSRF token;
//! - axe-core finds no serious or critical WCAG 2.1 AA violation on any
//!   page; screenshots land in `target/console-screenshots`.

use std::time::Duration;

use fantoccini::Locator;
use onceonly_certs::identity::Role;
use onceonly_integration_tests::browser::{self, Browser};
use onceonly_integration_tests::world::{
    ANNA, AUDITOR, AUTHORITIES, POLICY_ADMIN, SAMPLE_POLICY, World, birth_certificate,
};
use onceonly_proto::v1::{ErrorReason, RecordKind};

const BERLIN: &str = AUTHORITIES[0];
const MUENCHEN: &str = AUTHORITIES[1];

async fn click(browser: &Browser, css: &str) {
    browser
        .client()
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
        .click()
        .await
        .expect("clicked");
}

async fn set_value(browser: &Browser, id: &str, value: &str) {
    browser
        .client()
        .execute(
            "document.getElementById(arguments[0]).value = arguments[1];",
            vec![id.into(), value.into()],
        )
        .await
        .expect("value set");
}

/// The text of the element `css` (its first).
async fn text_of(browser: &Browser, css: &str) -> String {
    browser
        .client()
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
        .text()
        .await
        .expect("text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_without_a_client_certificate_is_refused() {
    if !browser::available() {
        return;
    }
    let world = World::start().await;
    let browser = Browser::start(&world.pki, None).await;
    let url = world.console_url();
    for path in ["/", "/policy", "/records", "/history"] {
        let text = browser.open(&format!("{url}{path}")).await;
        assert!(
            text.contains("presented no client certificate"),
            "{path} without a certificate: {text}"
        );
        assert!(
            !text.contains("Signed in"),
            "{path} showed the console: {text}"
        );
    }
    browser.assert_accessible("the refusal").await;
    browser.screenshot("refused-without-certificate").await;
    // In German too, for a browser that asks for German.
    let text = browser.open(&format!("{url}/?lang=de")).await;
    assert!(text.contains("kein Client-Zertifikat"), "{text}");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auditor_finds_an_exchange_and_sees_its_inclusion_proof_verified() {
    if !browser::available() {
        return;
    }
    let world = World::start().await;
    for n in 0..3 {
        world
            .authority(BERLIN)
            .request_evidence(birth_certificate(&format!("console-{n}")))
            .await
            .expect("allowed");
    }
    world.settle().await;
    let browser = Browser::start(&world.pki, Some((Role::Auditor, AUDITOR))).await;
    let url = world.console_url();

    let home = browser.open(&format!("{url}/")).await;
    assert!(
        home.contains(&format!("spiffe://onceonly.test/auditor/{AUDITOR}")),
        "{home}"
    );
    browser.assert_accessible("home").await;

    // Filter by caller: Berlin's three exchanges.
    let caller = format!("spiffe://onceonly.test/authority/{BERLIN}");
    let list = browser
        .open(&format!(
            "{url}/records?caller={caller}&outcome=EXCHANGE_OUTCOME_DELIVERED"
        ))
        .await;
    assert!(
        list.contains("3 records on this page"),
        "Berlin's three delivered exchanges: {list}"
    );
    browser.assert_accessible("records").await;
    browser.screenshot("auditor-records").await;

    // Open the first, and see its proof checked against the signed head.
    click(&browser, "tbody tr:first-child a").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let proof = loop {
        let proof = text_of(&browser, "#proof").await;
        if proof.contains("Inclusion proof verified") || tokio::time::Instant::now() > deadline {
            break proof;
        }
        // Not yet in a signed head: the page says so; reload.
        tokio::time::sleep(Duration::from_millis(300)).await;
        browser.client().refresh().await.expect("reload");
    };
    assert!(proof.contains("Inclusion proof verified"), "{proof}");
    let record = browser.text().await;
    assert!(
        record.contains("console-0") || record.contains("console-"),
        "{record}"
    );
    assert!(record.contains("birth-certificate"), "{record}");
    browser.assert_accessible("one record").await;
    browser.screenshot("auditor-record-proof-verified").await;

    // Save the head, let the log grow, and check the two heads.
    let head = browser.open(&format!("{url}/consistency")).await;
    assert!(head.contains("Tree size"), "{head}");
    let first_size = text_of(&browser, "#current-size").await;
    let first_root = text_of(&browser, "#current-root").await;
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("console-later"))
        .await
        .expect("allowed");
    world.settle().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    browser
        .client()
        .goto(&format!("{url}/consistency"))
        .await
        .expect("opens");
    let second_size = text_of(&browser, "#current-size").await;
    assert_ne!(first_size, second_size, "the log grew");
    set_value(&browser, "first_size", &first_size).await;
    set_value(&browser, "first_root", &first_root).await;
    browser.submit("form button", "#verdict").await;
    let verdict = text_of(&browser, "#verdict").await;
    assert!(verdict.starts_with("✓ Consistent"), "{verdict}");
    browser.assert_accessible("consistency").await;
    browser.screenshot("auditor-consistency").await;
    // A forged first root is not consistent.
    let forged = format!("{}{}", "0".repeat(63), "1");
    browser
        .client()
        .goto(&format!(
            "{url}/consistency?first_size={first_size}&first_root={forged}"
        ))
        .await
        .expect("opens");
    let verdict = text_of(&browser, "#verdict").await;
    assert!(verdict.contains("NOT consistent"), "{verdict}");

    // Anna's history, as her portal shows it; the look is recorded.
    let reads_before = world
        .audit_records()
        .await
        .iter()
        .filter(|r| r.kind() == RecordKind::HistoryRead)
        .count();
    browser
        .client()
        .goto(&format!("{url}/history"))
        .await
        .expect("opens");
    browser.assert_accessible("history form").await;
    set_value(&browser, "subject", ANNA).await;
    let history = browser.submit("form button", "#history-summary").await;
    assert!(
        history.contains("4 requests for evidence about this person"),
        "{history}"
    );
    assert!(history.contains("sent to the authority"), "{history}");
    browser.assert_accessible("history").await;
    browser.screenshot("citizen-history").await;
    let reads_after = world
        .audit_records()
        .await
        .iter()
        .filter(|r| r.kind() == RecordKind::HistoryRead)
        .count();
    assert_eq!(
        reads_after,
        reads_before + 1,
        "the look at Anna's history is recorded"
    );

    // An auditor is not policy staff.
    let policy = browser.open(&format!("{url}/policy")).await;
    assert!(
        policy.contains("This page is for the roles policy-admin"),
        "{policy}"
    );
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_staff_review_a_change_see_its_dry_run_apply_it_and_the_next_request_is_decided_by_it()
 {
    if !browser::available() {
        return;
    }
    let world = World::start().await;
    for n in 0..4 {
        for authority in [BERLIN, MUENCHEN] {
            world
                .authority(authority)
                .request_evidence(birth_certificate(&format!("{authority}-{n}")))
                .await
                .expect("allowed");
        }
    }
    world.settle().await;
    let browser = Browser::start(&world.pki, Some((Role::PolicyAdmin, POLICY_ADMIN))).await;
    let url = world.console_url();

    let editor = browser.open(&format!("{url}/policy")).await;
    assert!(editor.contains("Version in force"), "{editor}");
    browser.assert_accessible("policy editor").await;
    browser.screenshot("policy-editor").await;

    // A text the broker refuses: the error names the line, nothing applies.
    set_value(&browser, "text", "[[rule]]\nid = \"broken\"\n").await;
    let refused = browser.submit("form button", "p.bad").await;
    assert!(refused.contains("Not applicable"), "{refused}");
    assert!(refused.contains("(as edited):1:"), "the line: {refused}");

    // München out of the parental allowance offices.
    let edited = SAMPLE_POLICY.replace(
        r#"family-benefits = ["elterngeld-berlin", "elterngeld-muenchen"]"#,
        r#"family-benefits = ["elterngeld-berlin"]"#,
    );
    assert_ne!(edited, SAMPLE_POLICY);
    browser
        .client()
        .goto(&format!("{url}/policy"))
        .await
        .expect("opens");
    set_value(&browser, "text", &edited).await;
    let review = browser.submit("form button", "#dry-run-summary").await;
    let summary = text_of(&browser, "#dry-run-summary").await;
    assert!(
        summary.starts_with("4 of 8 decisions"),
        "München's four decisions would change: {summary}"
    );
    assert!(review.contains("allowed -> refused"), "{review}");
    assert!(
        review.matches(MUENCHEN).count() >= 4,
        "each of München's decisions is listed: {review}"
    );
    assert!(!review.contains(ANNA), "subjects appear as pseudonyms only");
    browser.assert_accessible("review").await;
    browser.screenshot("policy-review-dry-run").await;

    // Applying without ticking the confirmation: the browser holds the
    // form back (the box is required); past that, the broker refuses it.
    let version_before = world
        .running_broker()
        .broker()
        .expect("running")
        .policy
        .current()
        .version();
    browser
        .client()
        .execute(
            "document.getElementById('confirm').removeAttribute('required');",
            vec![],
        )
        .await
        .expect("script");
    let unconfirmed = browser.submit("section form button", "p[role=alert]").await;
    assert!(
        unconfirmed.contains("Confirm that you reviewed"),
        "{unconfirmed}"
    );
    assert_eq!(
        world
            .running_broker()
            .broker()
            .expect("running")
            .policy
            .current()
            .version(),
        version_before,
        "nothing applied unconfirmed"
    );

    // Reviewed again, confirmed, applied.
    browser
        .client()
        .goto(&format!("{url}/policy"))
        .await
        .expect("opens");
    set_value(&browser, "text", &edited).await;
    browser.submit("form button", "#confirm").await;
    click(&browser, "#confirm").await;
    let applied = browser
        .submit("section form button", "#applied-version")
        .await;
    assert!(applied.contains("In force now: version"), "{applied}");
    let version = text_of(&browser, "#applied-version").await;
    assert_eq!(version, (version_before + 1).to_string());
    browser.assert_accessible("applied").await;
    browser.screenshot("policy-applied").await;

    // The next request is decided by it.
    let refused = world
        .authority(MUENCHEN)
        .request_evidence(birth_certificate("after-the-change"))
        .await
        .expect_err("München is out");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let records = world
        .wait_for_records("after-the-change", 1, Duration::from_secs(20))
        .await;
    assert_eq!(records[0].error_reason(), ErrorReason::PolicyDenied);
    assert_eq!(records[0].policy_version, version_before + 1);
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("berlin-after"))
        .await
        .expect("Berlin still may");

    // The log's entry names the person whose certificate applied it.
    let entry = world
        .audit_records()
        .await
        .into_iter()
        .rfind(|r| r.kind() == RecordKind::PolicyApplied)
        .expect("a policy entry");
    assert_eq!(
        entry.policy_applied_by,
        format!("spiffe://onceonly.test/policy-admin/{POLICY_ADMIN}")
    );
    assert_eq!(entry.policy_version, version_before + 1);
    assert!(
        entry
            .policy_changes
            .iter()
            .any(|c| c.contains("elterngeld-muenchen")),
        "{:?}",
        entry.policy_changes
    );
    // The file is the policy in force, and the file watcher wrote no
    // second entry for it.
    assert_eq!(
        std::fs::read_to_string(world.policy_path()).expect("policy file"),
        edited
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let entries = world
        .audit_records()
        .await
        .into_iter()
        .filter(|r| r.kind() == RecordKind::PolicyApplied)
        .count();
    assert_eq!(
        entries, 2,
        "the start's entry and the console's, nothing more"
    );
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_posted_from_another_origin_is_refused_and_nothing_changes() {
    if !browser::available() {
        return;
    }
    let world = World::start().await;
    let browser = Browser::start(&world.pki, Some((Role::PolicyAdmin, POLICY_ADMIN))).await;
    let url = world.console_url();
    // The person's real token and the digest in force, as an attacker who
    // had seen the page would know them.
    browser.open(&format!("{url}/policy")).await;
    let token = browser
        .client()
        .find(Locator::Css("input[name=csrf]"))
        .await
        .expect("a token")
        .attr("value")
        .await
        .expect("attr")
        .expect("a value");
    let broker = world.running_broker().broker().expect("running");
    let before = broker.policy.current();
    let base = hex::encode(before.sha256());
    let edited = SAMPLE_POLICY.replace(
        r#"family-benefits = ["elterngeld-berlin", "elterngeld-muenchen"]"#,
        r#"family-benefits = ["elterngeld-berlin"]"#,
    );

    // Another origin: a page on another port that posts to the console
    // as soon as it loads (its own script: the attacker's page).
    for (name, csrf) in [
        ("without-token", "00"),
        ("with-stolen-token", token.as_str()),
    ] {
        let page = format!(
            r#"<!doctype html><html lang="en"><head><title>Win a prize</title></head><body>
<form id="f" method="post" action="{url}/policy/apply">
<input type="hidden" name="csrf" value="{csrf}">
<input type="hidden" name="base" value="{base}">
<input type="hidden" name="confirm" value="yes">
<textarea name="text">{text}</textarea>
</form><img alt="" src="{url}/history?scheme=SUBJECT_ID_SCHEME_DE_IDNR&amp;subject={ANNA}">
<script>document.getElementById("f").submit();</script></body></html>"#,
            text = edited.replace('&', "&amp;").replace('<', "&lt;"),
        );
        let text = browser.visit_foreign_page(page, &url).await;
        assert!(
            text.contains("did not come from a page of the console"),
            "{name}: {text}"
        );
        browser.screenshot(&format!("csrf-refused-{name}")).await;
        let now = broker.policy.current();
        assert_eq!(
            now.sha256(),
            before.sha256(),
            "{name}: the policy did not change"
        );
        assert_eq!(now.version(), before.version());
    }
    assert_eq!(
        std::fs::read_to_string(world.policy_path()).expect("policy file"),
        SAMPLE_POLICY,
        "the file did not change"
    );
    // The image the page loaded looked nobody up: a look-up is a form
    // with the token, never a link.
    assert!(
        !world
            .audit_records()
            .await
            .iter()
            .any(|r| r.kind() == RecordKind::HistoryRead),
        "no history read in the person's name"
    );
    browser.close().await;
}
