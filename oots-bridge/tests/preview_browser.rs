//! The citizen's preview in a real headless Chromium, through a real
//! broker and the sample civil register: the first EU request is answered
//! EDM:ERR:0002, the second waits; the person opens the preview over TLS,
//! signs in (the test sign-in), sees their birth certificate, and accepts,
//! declines, or lets T3 run out. Only an acceptance sends anything, and the
//! broker's log holds each step. axe-core checks every page (WCAG 2.1 AA).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::access_point::{AccessPoint, deliver, document, retrieved, serve, submitted};
use common::world::bridge_for;
use common::{asked, error_of, preview_location, second_request};
use onceonly_certs::identity::Role;
use onceonly_integration_tests::browser::{self, Browser};
use onceonly_integration_tests::world::World;
use onceonly_oots_bridge::bridge::Bridge;
use onceonly_oots_bridge::broker::BrokerSource;
use onceonly_oots_bridge::mapping::Assurance;
use onceonly_oots_bridge::preview::sign_in::{Person, TestSignIn};
use onceonly_oots_bridge::preview::{PreviewSettings, PreviewSpace};
use onceonly_oots_bridge::transport::domibus::DomibusWs;
use onceonly_proto::v1::{AuditRecord, PreviewStep, RecordKind};

const SECOND: &str = "urn:uuid:00000000-0000-4000-8000-0000000000b2";
const ANNA: &str = "anna-8c41";
const SOMEONE_ELSE: &str = "otto-1d07";

struct Running {
    world: World,
    point: Arc<AccessPoint>,
    bridge: Arc<Bridge<DomibusWs, BrokerSource>>,
    browser: Browser,
    _dir: tempfile::TempDir,
}

async fn start(decide_within: Duration) -> Running {
    let world = World::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let point = Arc::new(AccessPoint::default());
    let endpoint = serve(point.clone()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let public_url = format!("https://{}", listener.local_addr().expect("addr"));
    let bridge = Arc::new(
        bridge_for(&world, dir.path(), &endpoint, "preview = true").with_preview(Arc::new(
            PreviewSpace::new(PreviewSettings {
                public_url,
                reach_within: Duration::from_secs(120),
                decide_within,
            }),
        )),
    );
    // Any certificate the browser trusts for 127.0.0.1 will do; here the
    // broker's, from the test CA the browser trusts.
    let (cert, key) = world.pki.participant_paths(Role::Broker, "broker");
    let tls = onceonly_certs::tls::web_server_config(&cert, &key).expect("the site's TLS");
    let person = |identifier: &str| Person {
        identifier: identifier.into(),
        level_of_assurance: Assurance::High,
    };
    let sign_in = TestSignIn::with([
        (ANNA.to_owned(), person("DE/AT/7f3c9e21a4b8")),
        (SOMEONE_ELSE.to_owned(), person("DE/AT/0000000000")),
    ]);
    onceonly_oots_bridge::pages::spawn(listener, tls, bridge.clone(), Arc::new(sign_in));
    let browser = Browser::start(&world.pki, None).await;
    Running {
        world,
        point,
        bridge,
        browser,
        _dir: dir,
    }
}

impl Running {
    async fn deliver(&self, id: &str, message: String) -> Vec<String> {
        deliver(&self.point, &self.bridge, id, message).await
    }

    /// The two requests of the exchange delivered: the location the first
    /// was answered with; the second waits.
    async fn both_requests(&self) -> String {
        let first = self.deliver("m1", retrieved(&asked(&[]), "conv-1")).await;
        assert_eq!(error_of(&first[0]).0, "EDM:ERR:0002", "{}", first[0]);
        let location = preview_location(&first[0]);
        let second = self
            .deliver(
                "m2",
                retrieved(
                    &second_request(
                        SECOND,
                        &location,
                        &[(
                            "<p:Format>application/json</p:Format>",
                            "<p:Format>application/xml</p:Format>",
                        )],
                    ),
                    "conv-1",
                ),
            )
            .await;
        assert!(second.is_empty(), "the second request waits: {second:?}");
        location
    }

    /// Signs in with `code` at the open sign-in page.
    async fn sign_in(&self, code: &str, expect: &str) -> String {
        self.browser.type_into("#code", code).await;
        self.browser.submit("#sign-in", expect).await
    }

    /// Opens `location`, is refused as someone else, then signs in as
    /// Anna and sees her birth certificate.
    async fn anna_sees_her_evidence(&self, location: &str) -> String {
        let page = self.browser.open(location).await;
        assert!(page.contains("Sign in to see the evidence"), "{page}");
        self.browser.assert_accessible("the sign-in").await;
        let refused = self.sign_in(SOMEONE_ELSE, "main [role=alert]").await;
        assert!(refused.contains("Not your evidence"), "{refused}");
        assert!(!refused.contains("Schneider"), "{refused}");
        self.browser.assert_accessible("the refusal").await;
        // In German, too.
        let german = self.browser.open(&format!("{location}?lang=de")).await;
        assert!(german.contains("Anmeldecode"), "{german}");
        self.browser.assert_accessible("the German sign-in").await;
        self.browser.open(location).await;
        let page = self.sign_in(ANNA, "#accept").await;
        assert!(page.contains("Your evidence, before it is sent"), "{page}");
        assert!(
            page.contains("Stadt Wien, Magistratsabteilung 35"),
            "who asks: {page}"
        );
        assert!(
            page.contains("Schneider") && page.contains("1990-03-14"),
            "the register's evidence: {page}"
        );
        self.browser.assert_accessible("the evidence").await;
        page
    }

    /// The preview steps recorded in the broker's log, in order, with the
    /// exchange each names.
    async fn steps(&self) -> (Vec<PreviewStep>, Vec<AuditRecord>) {
        self.world.settle().await;
        let records = self.world.audit_records().await;
        let steps: Vec<AuditRecord> = records
            .iter()
            .filter(|r| r.kind() == RecordKind::PreviewStep)
            .cloned()
            .collect();
        let exchange = records
            .iter()
            .find(|r| r.kind() == RecordKind::Unspecified && r.request_id == common::ID)
            .expect("the first request's exchange");
        for step in &steps {
            assert_eq!(step.preview_of_exchange_id, exchange.exchange_id);
            assert_eq!(step.caller_id, exchange.caller_id);
            assert_eq!(step.subject_pseudonym, exchange.subject_pseudonym);
            assert_eq!(step.evidence_type, "birth-certificate");
            assert!(
                step.correlation_ids
                    .iter()
                    .any(|c| c.name == "oots.exchange_id" && c.value == "ex-42"),
                "{step:?}"
            );
        }
        (steps.iter().map(|r| r.preview_step()).collect(), records)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_the_second_request_is_answered_with_the_registers_evidence() {
    if !browser::available() {
        return;
    }
    let running = start(Duration::from_secs(120)).await;
    let location = running.both_requests().await;
    running.anna_sees_her_evidence(&location).await;
    running.browser.screenshot("preview-evidence").await;
    assert_eq!(
        submitted(&running.point).len(),
        1,
        "nothing sent before she decides"
    );

    let page = running
        .browser
        .submit("#accept", "main [role=status]")
        .await;
    assert!(
        page.contains("Sent") && page.contains("Back to the portal"),
        "{page}"
    );
    running.browser.assert_accessible("the sent page").await;
    let answers = submitted(&running.point);
    assert_eq!(answers.len(), 2);
    let sent = &answers[1];
    assert_eq!(sent.action, "ExecuteQueryResponse", "{}", document(sent));
    assert!(document(sent).contains(&format!(r#"requestId="{SECOND}""#)));
    let evidence = String::from_utf8(sent.payloads[1].bytes.clone()).expect("xml");
    assert!(evidence.contains("Schneider"), "{evidence}");
    let (steps, _) = running.steps().await;
    assert_eq!(
        steps,
        [
            PreviewStep::Offered,
            PreviewStep::Shown,
            PreviewStep::Accepted,
            PreviewStep::Forwarded
        ]
    );
    // Opened again: what became of it, no evidence, no decision to make.
    let again = running.browser.open(&location).await;
    assert!(
        again.contains("Sent") && !again.contains("1990-03-14"),
        "{again}"
    );
    assert_eq!(submitted(&running.point).len(), 2);
    running.browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_nothing_is_released_and_the_answer_is_an_error() {
    if !browser::available() {
        return;
    }
    let running = start(Duration::from_secs(120)).await;
    let location = running.both_requests().await;
    running.anna_sees_her_evidence(&location).await;
    // Another site posts "send" in her name, with her real form token:
    // refused, nothing sent, and she still decides.
    let token = running.browser.value_of("input[name=form_token]").await;
    let forged = running
        .browser
        .visit_foreign_page(
            format!(
                r#"<!doctype html><html lang="en"><head><title>Win a prize</title></head><body>
<form id="f" method="post" action="{location}/decision">
<input type="hidden" name="form_token" value="{token}"><input type="hidden" name="choice" value="accept">
</form><script>document.getElementById("f").submit();</script></body></html>"#
            ),
            &location,
        )
        .await;
    assert!(forged.contains("Your decision was not taken"), "{forged}");
    assert_eq!(submitted(&running.point).len(), 1, "nothing sent");
    let page = running.browser.open(&location).await;
    assert!(page.contains("1990-03-14"), "still hers to decide: {page}");
    let page = running
        .browser
        .submit("#decline", "main [role=status]")
        .await;
    assert!(page.contains("Not sent"), "{page}");
    running.browser.assert_accessible("the declined page").await;
    let answers = submitted(&running.point);
    assert_eq!(answers.len(), 2);
    assert_eq!(answers[1].action, "ExceptionResponse");
    assert_eq!(answers[1].payloads.len(), 1, "no evidence part");
    assert_eq!(
        error_of(&document(&answers[1])),
        ("EDM:ERR:0004".into(), "R-BRIDGE-PREVIEW-DECLINED".into())
    );
    assert!(!document(&answers[1]).contains("Schneider"));
    let (steps, _) = running.steps().await;
    assert_eq!(
        steps,
        [
            PreviewStep::Offered,
            PreviewStep::Shown,
            PreviewStep::Declined
        ],
        "the forged post recorded nothing"
    );
    // The page, opened again, shows no evidence.
    let again = running.browser.open(&location).await;
    assert!(!again.contains("1990-03-14"), "{again}");
    running.browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_decision_within_t3_times_out_and_nothing_is_released() {
    if !browser::available() {
        return;
    }
    let t3 = Duration::from_secs(4);
    let running = start(t3).await;
    let location = running.both_requests().await;
    running.anna_sees_her_evidence(&location).await;
    tokio::time::sleep(t3 + Duration::from_millis(500)).await;
    // The bridge's poll closes what ran out, and answers the waiting request.
    running.bridge.poll_once().await.expect("polled");
    let answers = submitted(&running.point);
    assert_eq!(answers.len(), 2);
    assert_eq!(answers[1].payloads.len(), 1, "no evidence part");
    assert_eq!(
        error_of(&document(&answers[1])),
        ("EDM:ERR:0005".into(), "R-BRIDGE-PREVIEW-EXPIRED".into())
    );
    // Accepting now is too late.
    let page = running.browser.submit("#accept", "main").await;
    assert!(
        page.contains("Time ran out") && page.contains("nothing was sent"),
        "{page}"
    );
    running.browser.assert_accessible("the too-late page").await;
    assert_eq!(submitted(&running.point).len(), 2, "nothing more sent");
    let (steps, _) = running.steps().await;
    assert_eq!(
        steps,
        [
            PreviewStep::Offered,
            PreviewStep::Shown,
            PreviewStep::Expired
        ]
    );
    running.browser.close().await;
}
