//! What portals (and auditors) do with a subject's data, recorded in the
//! same tamper-evident log as the exchanges: consent grants and revocations,
//! listings of a subject's consents, and reads of a subject's history. The
//! record is written before the answer (or the change); where it cannot be,
//! the call fails with UNAVAILABLE (AUDIT_UNAVAILABLE) and changes nothing.
//! The records carry the subject as its pseudonym, like every record, so
//! they show in that subject's view.

use onceonly_certs::Participant;
use onceonly_proto::v1::{AuditRecord, RecordKind, SubjectId};
use rand::RngCore;
use tonic::Code;

use crate::exchange::Broker;
use crate::refusal::ServiceRefusal;
use onceonly_proto::time::{now_ms, timestamp};

/// What an access concerned, beyond who and whom.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// The consent concerned, if any.
    pub consent_id: String,
    /// The evidence type concerned, if any.
    pub evidence_type: String,
    /// The purpose concerned, if any.
    pub purpose: String,
    /// The authority a consent is for, if any.
    pub consent_authority_id: String,
}

impl Broker {
    /// Records a consent change by `caller`, then makes it with `change`,
    /// in a task of its own: a caller that goes away between the two (a
    /// cancel, its deadline) cannot leave a record of a change that was
    /// never made. Where the change fails after its record, a second record
    /// says it was not carried out.
    pub async fn change_consent<F, Fut>(
        self: &std::sync::Arc<Self>,
        kind: RecordKind,
        caller: Participant,
        subject: SubjectId,
        access: Access,
        change: F,
    ) -> Result<crate::consent::StoredConsent, ServiceRefusal>
    where
        F: FnOnce(std::sync::Arc<Broker>) -> Fut + Send + 'static,
        Fut: std::future::Future<
                Output = Result<crate::consent::StoredConsent, crate::consent::ConsentError>,
            > + Send,
    {
        let broker = self.clone();
        let task = tokio::spawn(async move {
            broker
                .record_access(kind, &caller, &subject, access.clone())
                .await?;
            match change(broker.clone()).await {
                Ok(consent) => Ok(consent),
                Err(e) => {
                    broker
                        .record_failed_access(kind, &caller, &subject, access, &e)
                        .await;
                    Err(ServiceRefusal::Consent(e))
                }
            }
        });
        task.await
            .unwrap_or_else(|e| Err(ServiceRefusal::ChangeFailed(e.to_string())))
    }

    /// Records that `caller` did `kind` about `subject`; Err (UNAVAILABLE,
    /// AUDIT_UNAVAILABLE) where the record could not be written, in which
    /// case the caller must not go on.
    pub async fn record_access(
        &self,
        kind: RecordKind,
        caller: &Participant,
        subject: &SubjectId,
        access: Access,
    ) -> Result<crate::storage::Appended, ServiceRefusal> {
        let record = self.access_record(kind, caller, subject, access);
        self.audit.append(record).await.map_err(|audit_error| {
            tracing::error!(%audit_error, ?kind, caller = %caller, "access record not written: refused");
            ServiceRefusal::NotRecorded
        })
    }

    /// Records, best effort, that an access recorded as asked for then
    /// failed (`failure`), so the log does not claim a change that did not
    /// happen.
    pub async fn record_failed_access(
        &self,
        kind: RecordKind,
        caller: &Participant,
        subject: &SubjectId,
        access: Access,
        failure: &(dyn std::fmt::Display + Sync),
    ) {
        let record = AuditRecord {
            status_code: Code::Unavailable as i32,
            status_message: format!("not carried out: {failure}"),
            ..self.access_record(kind, caller, subject, access)
        };
        if let Err(audit_error) = self.audit.append(record).await {
            tracing::error!(%audit_error, ?kind, "could not record that an access failed");
        }
    }

    fn access_record(
        &self,
        kind: RecordKind,
        caller: &Participant,
        subject: &SubjectId,
        access: Access,
    ) -> AuditRecord {
        let mut id = [0u8; 12];
        rand::rng().fill_bytes(&mut id);
        AuditRecord {
            exchange_id: format!("acc-{}", hex::encode(id)),
            received_at: Some(timestamp(now_ms())),
            caller_id: caller.spiffe_id(),
            kind: kind as i32,
            subject_scheme: subject.scheme,
            subject_pseudonym: self.pseudonyms.pseudonym(subject.scheme, &subject.value),
            consent_id: access.consent_id,
            evidence_type: access.evidence_type,
            purpose: access.purpose,
            consent_authority_id: access.consent_authority_id,
            ..Default::default()
        }
    }
}
