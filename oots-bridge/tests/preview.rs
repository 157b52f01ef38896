//! The citizen's preview, step by step, without a browser: the first
//! request answered EDM:ERR:0002 with a location, the second held until
//! the person decides, each step recorded before it takes effect, and
//! every way it can go wrong (someone else signing in, a weak sign-in,
//! declining, T2 and T3 running out, a second request that does not fit,
//! a log that cannot record). The evidence source is a fixed one; the
//! browser tests (`preview_browser.rs`) run the same through a real broker.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::access_point::{AccessPoint, deliver, document, retrieved, serve, submitted};
use common::fixed::Fixed;
use common::{
    CLASSIFICATION, ID, error_of, preview_location, provider, request_with, second_request,
};
use onceonly_oots_bridge::bridge::{Bridge, PreviewRefusal};
use onceonly_oots_bridge::mapping::{Assurance, Mapping};
use onceonly_oots_bridge::preview::sign_in::Person;
use onceonly_oots_bridge::preview::{PreviewSettings, PreviewSpace, State};
use onceonly_oots_bridge::transport::domibus::DomibusWs;
use onceonly_proto::v1::PreviewStep;

const PUBLIC: &str = "https://preview.bridge.example";
const SECOND: &str = "urn:uuid:00000000-0000-4000-8000-0000000000b2";

fn mapping(dir: &std::path::Path) -> Mapping {
    let path = dir.join("mapping.toml");
    std::fs::write(
        &path,
        format!(
            "[[evidence]]\nclassification = \"{CLASSIFICATION}\"\nprocedures = [\"T1\"]\nevidence_type = \"birth-certificate\"\nlegal_basis = \"Art. 14 VO (EU) 2018/1724\"\nformat = \"application/json\"\npreview = true\nlevel_of_assurance = \"substantial\"\n"
        ),
    )
    .expect("write");
    Mapping::load(&path).expect("mapping")
}

struct Setup {
    point: Arc<AccessPoint>,
    bridge: Bridge<DomibusWs, Fixed>,
    _dir: tempfile::TempDir,
}

/// A bridge answering from a fixed source at a fresh access point, its
/// mapping asking for the preview.
async fn unpreviewed() -> Setup {
    let dir = tempfile::tempdir().expect("dir");
    let point = Arc::new(AccessPoint::default());
    let endpoint = serve(point.clone()).await;
    let bridge = Bridge::new(
        DomibusWs::new(endpoint.parse().expect("uri")),
        Fixed::default(),
        mapping(dir.path()),
        provider(),
    );
    Setup {
        point,
        bridge,
        _dir: dir,
    }
}

/// The same, offering the preview.
async fn setup(reach_within: Duration, decide_within: Duration) -> Setup {
    let Setup {
        point,
        bridge,
        _dir: dir,
    } = unpreviewed().await;
    let bridge = bridge.with_preview(Arc::new(PreviewSpace::new(PreviewSettings {
        public_url: PUBLIC.into(),
        reach_within,
        decide_within,
    })));
    Setup {
        point,
        bridge,
        _dir: dir,
    }
}

impl Setup {
    /// Delivers `request` as message `id` and polls; the answers submitted
    /// since.
    async fn deliver(&self, id: &str, message: String) -> Vec<String> {
        deliver(&self.point, &self.bridge, id, message).await
    }

    /// The first request delivered, its location.
    async fn first(&self) -> String {
        let answers = self
            .deliver("m1", retrieved(&request_with(&[]), "conv-1"))
            .await;
        assert_eq!(answers.len(), 1);
        let (code, _) = error_of(&answers[0]);
        assert_eq!(code, "EDM:ERR:0002", "{}", answers[0]);
        preview_location(&answers[0])
    }

    fn held(&self, location: &str) -> onceonly_oots_bridge::preview::Held {
        self.bridge
            .preview_space()
            .expect("a preview space")
            .at(location)
            .expect("the preview")
    }

    fn steps(&self) -> Vec<PreviewStep> {
        self.bridge.source().steps()
    }

    /// Anna signed in at `location`'s preview: it, and her session.
    async fn anna_signed_in(
        &self,
        location: &str,
    ) -> (onceonly_oots_bridge::preview::Held, String) {
        let held = self.held(location);
        let session = self
            .bridge
            .sign_in(&held, &anna(Assurance::High))
            .await
            .expect("Anna signs in");
        (held, session.id)
    }

    /// The second request delivered, under `SECOND`: the answers.
    async fn second(&self, location: &str) -> Vec<String> {
        self.deliver(
            "m2",
            retrieved(&second_request(SECOND, location, &[]), "conv-1"),
        )
        .await
    }
}

fn anna(level: Assurance) -> Person {
    Person {
        identifier: "DE/AT/7f3c9e21a4b8".into(),
        level_of_assurance: level,
    }
}

#[tokio::test]
async fn the_second_request_is_answered_with_the_evidence_only_once_the_person_accepted() {
    let setup = setup(Duration::from_secs(60), Duration::from_secs(60)).await;
    let location = setup.first().await;
    assert!(
        location.starts_with(&format!("{PUBLIC}/preview/")) && location.len() > PUBLIC.len() + 20,
        "{location}"
    );
    let answer = &submitted(&setup.point)[0];
    assert_eq!(answer.action, "ExceptionResponse");
    assert!(document(answer).contains(
        r#"severity="urn:sr.oots.tech.ec.europa.eu:codes:ErrorSeverity:EDMErrorResponse:PreviewRequired""#
    ));
    assert_eq!(answer.payloads.len(), 1, "no evidence goes with a 0002");
    assert_eq!(setup.steps(), [PreviewStep::Offered]);
    // The first request again: the same answer, the same location, one
    // fetch.
    let again = setup
        .deliver("m1-again", retrieved(&request_with(&[]), "conv-1"))
        .await;
    assert_eq!(preview_location(&again[0]), location);
    assert_eq!(setup.bridge.source().calls.load(Ordering::SeqCst), 1);

    // The second request waits for the person, delivered twice or not.
    let second = retrieved(&second_request(SECOND, &location, &[]), "conv-1");
    assert!(setup.deliver("m2", second.clone()).await.is_empty());
    assert!(setup.deliver("m2-again", second.clone()).await.is_empty());

    let held = setup.held(&location);
    // Someone else, and Anna at too low a level, see nothing.
    let someone_else = Person {
        identifier: "DE/AT/0000000000".into(),
        level_of_assurance: Assurance::High,
    };
    assert_eq!(
        setup.bridge.sign_in(&held, &someone_else).await.err(),
        Some(PreviewRefusal::NotTheirs)
    );
    assert_eq!(
        setup
            .bridge
            .sign_in(&held, &anna(Assurance::Low))
            .await
            .err(),
        Some(PreviewRefusal::TooWeak)
    );
    assert_eq!(setup.steps(), [PreviewStep::Offered]);
    let session = setup
        .bridge
        .sign_in(&held, &anna(Assurance::Substantial))
        .await
        .expect("Anna signs in");
    assert_eq!(setup.steps(), [PreviewStep::Offered, PreviewStep::Shown]);
    assert_eq!(
        setup.bridge.decide(&held, "not-the-session", true).await,
        Err(PreviewRefusal::NotSignedIn)
    );
    assert!(submitted(&setup.point).len() == 2, "nothing sent yet");

    assert_eq!(
        setup.bridge.decide(&held, &session.id, true).await,
        Ok(State::Forwarded)
    );
    assert_eq!(
        setup.steps(),
        [
            PreviewStep::Offered,
            PreviewStep::Shown,
            PreviewStep::Accepted,
            PreviewStep::Forwarded
        ]
    );
    let answers = submitted(&setup.point);
    assert_eq!(answers.len(), 3, "the held second request, answered once");
    let sent = &answers[2];
    assert_eq!(sent.action, "ExecuteQueryResponse", "{}", document(sent));
    assert!(document(sent).contains(&format!(r#"requestId="{SECOND}""#)));
    assert_eq!(
        sent.payloads[1].bytes,
        br#"{"evidence_type":"birth-certificate","family_name":"Schneider"}"#
    );
    assert_eq!(
        setup.bridge.decide(&held, &session.id, false).await,
        Err(PreviewRefusal::Closed(State::Forwarded))
    );
    assert!(held.lock().await.evidence.is_none(), "dropped once sent");
    // The second request again: the same answer.
    let again = setup.deliver("m2-late", second).await;
    assert_eq!(again, [document(sent)]);
    // A new request on the used location: refused.
    let third = setup
        .deliver(
            "m3",
            retrieved(
                &second_request(
                    "urn:uuid:00000000-0000-4000-8000-0000000000b3",
                    &location,
                    &[],
                ),
                "conv-1",
            ),
        )
        .await;
    assert_eq!(
        error_of(&third[0]),
        ("EDM:ERR:0003".into(), "R-BRIDGE-PREVIEW-USED".into())
    );
}

#[tokio::test]
async fn a_decision_before_the_second_request_is_kept_for_it() {
    let setup = setup(Duration::from_secs(60), Duration::from_secs(60)).await;
    let location = setup.first().await;
    let (held, session) = setup.anna_signed_in(&location).await;
    assert_eq!(
        setup.bridge.decide(&held, &session, true).await,
        Ok(State::Accepted)
    );
    assert_eq!(submitted(&setup.point).len(), 1, "nothing to answer yet");
    let answers = setup.second(&location).await;
    assert!(answers[0].contains("ExecuteQueryResponse") || answers[0].contains("QueryResponse"));
    assert!(answers[0].contains(&format!(r#"requestId="{SECOND}""#)));
    assert!(!answers[0].contains("Exception"), "{}", answers[0]);
    assert_eq!(setup.steps().last(), Some(&PreviewStep::Forwarded));
}

#[tokio::test]
async fn declined_or_run_out_previews_send_nothing() {
    // Declined.
    let setup = setup(Duration::from_secs(60), Duration::from_secs(60)).await;
    let location = setup.first().await;
    assert!(setup.second(&location).await.is_empty());
    let (held, session) = setup.anna_signed_in(&location).await;
    assert_eq!(
        setup.bridge.decide(&held, &session, false).await,
        Ok(State::Declined)
    );
    let answers = submitted(&setup.point);
    assert_eq!(answers.len(), 2);
    assert_eq!(answers[1].action, "ExceptionResponse");
    assert_eq!(answers[1].payloads.len(), 1, "no evidence");
    assert_eq!(
        error_of(&document(&answers[1])),
        ("EDM:ERR:0004".into(), "R-BRIDGE-PREVIEW-DECLINED".into())
    );
    assert_eq!(
        setup.steps(),
        [
            PreviewStep::Offered,
            PreviewStep::Shown,
            PreviewStep::Declined
        ]
    );
    assert!(held.lock().await.evidence.is_none(), "dropped at once");

    // T2: the person never comes; the second request comes later.
    let setup = self::setup(Duration::from_millis(300), Duration::from_secs(60)).await;
    let location = setup.first().await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    setup.bridge.poll_once().await.expect("polled");
    assert_eq!(setup.steps(), [PreviewStep::Offered, PreviewStep::Expired]);
    let held = setup.held(&location);
    assert!(held.lock().await.evidence.is_none());
    assert_eq!(
        setup
            .bridge
            .sign_in(&held, &anna(Assurance::High))
            .await
            .err(),
        Some(PreviewRefusal::Closed(State::Expired))
    );
    // Someone else learns nothing, not even that it ran out.
    let someone_else = Person {
        identifier: "DE/AT/0000000000".into(),
        level_of_assurance: Assurance::High,
    };
    assert_eq!(
        setup.bridge.sign_in(&held, &someone_else).await.err(),
        Some(PreviewRefusal::NotTheirs)
    );
    let late = setup.second(&location).await;
    assert_eq!(
        error_of(&late[0]),
        ("EDM:ERR:0005".into(), "R-BRIDGE-PREVIEW-EXPIRED".into())
    );

    // T3: the person signs in and does not decide; the waiting second
    // request is answered when the time runs out, and a decision after
    // that is refused.
    let setup = self::setup(Duration::from_secs(60), Duration::from_millis(300)).await;
    let location = setup.first().await;
    assert!(setup.second(&location).await.is_empty());
    let (held, session) = setup.anna_signed_in(&location).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    setup.bridge.poll_once().await.expect("polled");
    let answers = submitted(&setup.point);
    assert_eq!(answers.len(), 2);
    assert_eq!(
        error_of(&document(&answers[1])),
        ("EDM:ERR:0005".into(), "R-BRIDGE-PREVIEW-EXPIRED".into())
    );
    assert_eq!(
        setup.bridge.decide(&held, &session, true).await,
        Err(PreviewRefusal::Closed(State::Expired))
    );
    assert_eq!(
        setup.steps(),
        [
            PreviewStep::Offered,
            PreviewStep::Shown,
            PreviewStep::Expired
        ]
    );
}

#[tokio::test]
async fn second_requests_that_do_not_fit_their_preview_are_refused() {
    let setup = setup(Duration::from_secs(60), Duration::from_secs(60)).await;
    // A request that allows no preview, for evidence sent only after one.
    let no_preview = setup
        .deliver(
            "m0",
            retrieved(
                &request_with(&[
                    (ID, "urn:uuid:00000000-0000-4000-8000-0000000000a0"),
                    (
                    r#"<r:Slot name="PossibilityForPreview"><r:SlotValue x:type="r:BooleanValueType"><r:Value>true"#,
                    r#"<r:Slot name="PossibilityForPreview"><r:SlotValue x:type="r:BooleanValueType"><r:Value>false"#,
                ),
                ]),
                "conv-0",
            ),
        )
        .await;
    assert_eq!(
        error_of(&no_preview[0]),
        ("EDM:ERR:0007".into(), "R-BRIDGE-PREVIEW-REQUIRED".into())
    );
    assert_eq!(setup.bridge.source().calls.load(Ordering::SeqCst), 0);

    let location = setup.first().await;
    let refused = |id: &str| format!("urn:uuid:00000000-0000-4000-8000-0000000000{id}");
    // Another first request in the same exchange, while its preview is
    // open: refused, not a second preview.
    let again = setup
        .deliver(
            "m1-other",
            retrieved(&request_with(&[(ID, &refused("c0"))]), "conv-1"),
        )
        .await;
    assert_eq!(
        error_of(&again[0]),
        ("EDM:ERR:0003".into(), "R-BRIDGE-PREVIEW-OPEN".into())
    );
    assert_eq!(setup.bridge.preview_space().expect("space").len(), 1);
    // A location this bridge never gave.
    let unknown = setup
        .deliver(
            "m2",
            retrieved(
                &second_request(&refused("c1"), &format!("{PUBLIC}/preview/forged"), &[]),
                "conv-1",
            ),
        )
        .await;
    assert_eq!(
        error_of(&unknown[0]),
        ("EDM:ERR:0006".into(), "R-BRIDGE-PREVIEW-LOCATION".into())
    );
    // Another exchange, another person, another requester.
    for (n, message) in [
        retrieved(&second_request(&refused("c2"), &location, &[]), "conv-1")
            .replace(">ex-42<", ">ex-43<"),
        retrieved(
            &second_request(
                &refused("c3"),
                &location,
                &[("DE/AT/7f3c9e21a4b8", "DE/AT/0000000000")],
            ),
            "conv-1",
        ),
        retrieved(
            &second_request(&refused("c4"), &location, &[(">AT123456789<", ">AT999<")]),
            "conv-1",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let answers = setup.deliver(&format!("m-misfit-{n}"), message).await;
        assert_eq!(
            error_of(&answers[0]),
            ("EDM:ERR:0003".into(), "R-BRIDGE-PREVIEW-EXCHANGE".into()),
            "misfit {n}"
        );
    }
    // The fitting one still waits.
    assert!(
        setup
            .deliver(
                "m3",
                retrieved(&second_request(SECOND, &location, &[]), "conv-1"),
            )
            .await
            .is_empty()
    );
    // A second one waiting beside it is refused.
    let beside = setup
        .deliver(
            "m4",
            retrieved(&second_request(&refused("c5"), &location, &[]), "conv-1"),
        )
        .await;
    assert_eq!(
        error_of(&beside[0]),
        ("EDM:ERR:0003".into(), "R-BRIDGE-PREVIEW-WAITING".into())
    );

    // A log that cannot record: not shown, nothing decided.
    let held = setup.held(&location);
    setup
        .bridge
        .source()
        .refuse_steps
        .store(true, Ordering::SeqCst);
    assert_eq!(
        setup
            .bridge
            .sign_in(&held, &anna(Assurance::High))
            .await
            .err(),
        Some(PreviewRefusal::NotRecorded)
    );
    assert_eq!(held.lock().await.state, State::Offered);
    // And a first request whose offer cannot be recorded holds nothing.
    let unheld = setup
        .deliver(
            "m5",
            retrieved(
                &request_with(&[(ID, "urn:uuid:00000000-0000-4000-8000-0000000000d1")]),
                "conv-5",
            )
            .replace(">ex-42<", ">ex-77<"),
        )
        .await;
    assert_eq!(error_of(&unheld[0]).0, "EDM:ERR:0005");
    assert!(!unheld[0].contains("PreviewLocation"));
}

#[tokio::test]
async fn without_a_preview_space_evidence_needing_a_preview_is_not_sent() {
    let Setup { point, bridge, .. } = unpreviewed().await;
    point
        .pending
        .lock()
        .expect("lock")
        .push(("m1".into(), retrieved(&request_with(&[]), "conv-1")));
    point.pending.lock().expect("lock").push((
        "m2".into(),
        retrieved(
            &second_request(SECOND, &format!("{PUBLIC}/preview/x"), &[]),
            "conv-1",
        ),
    ));
    bridge.poll_once().await.expect("polled");
    let answers = submitted(&point);
    assert_eq!(error_of(&document(&answers[0])).0, "EDM:ERR:0007");
    assert_eq!(error_of(&document(&answers[1])).0, "EDM:ERR:0007");
    assert_eq!(bridge.source().calls.load(Ordering::SeqCst), 0);
}
