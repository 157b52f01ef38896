//! A fixed evidence source for the bridge's tests: the same evidence for
//! every request, its calls counted, the preview's steps kept in order
//! (and refused on demand, as a broker whose log is down would).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use onceonly_oots_bridge::bridge::{EvidenceSource, Fetched};
use onceonly_oots_bridge::edm::request::Agent;
use onceonly_oots_bridge::edm::{EdmError, ErrorCode, QueryRequest};
use onceonly_oots_bridge::mapping::Entry;
use onceonly_oots_bridge::preview::Preview;
use onceonly_oots_bridge::transport::Message;
use onceonly_proto::v1::PreviewStep;

#[derive(Default)]
pub struct Fixed {
    /// Evidence fetched.
    pub calls: AtomicUsize,
    /// The preview steps recorded, with the exchange each names.
    pub steps: Mutex<Vec<(String, PreviewStep)>>,
    /// While set, steps are refused (not recorded).
    pub refuse_steps: AtomicBool,
}

impl Fixed {
    /// The steps recorded so far.
    pub fn steps(&self) -> Vec<PreviewStep> {
        self.steps
            .lock()
            .expect("lock")
            .iter()
            .map(|(_, step)| *step)
            .collect()
    }
}

impl EvidenceSource for Fixed {
    async fn fetch(
        &self,
        request: &QueryRequest,
        entry: &Entry,
        _: &Message,
    ) -> Result<Fetched, EdmError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Fetched {
            bytes: format!(
                r#"{{"evidence_type":"{}","family_name":"{}"}}"#,
                entry.evidence_type, request.person.family_name
            )
            .into_bytes(),
            issuing_authority: Agent {
                identifier: "civil-register".into(),
                scheme: "urn:onceonly:connector".into(),
                name: "Melderegister Berlin".into(),
                classification: String::new(),
            },
            issuing_date: "2026-12-05".into(),
            exchange_id: format!("ex-{n}"),
        })
    }

    async fn record_step(&self, preview: &Preview, step: PreviewStep) -> Result<(), EdmError> {
        if self.refuse_steps.load(Ordering::SeqCst) {
            return Err(EdmError::new(ErrorCode::Timeout, "the log is down"));
        }
        self.steps
            .lock()
            .expect("lock")
            .push((preview.exchange_id.clone(), step));
        Ok(())
    }
}
