//! What portals (and auditors) do with a subject's data, recorded in the
//! same tamper-evident log as the exchanges: consent grants and revocations,
//! listings of a subject's consents, and reads of a subject's history. The
//! record is written before the answer (or the change); where it cannot be,
//! the call fails with UNAVAILABLE (AUDIT_UNAVAILABLE) and changes nothing.
//! The records carry the subject as its pseudonym, like every record, so
//! they show in that subject's view.
//!
//! Also here: the steps of a subject's preview of evidence an authority
//! received (the OOTS bridge's citizen preview), each tied to the caller's
//! own exchange that delivered the evidence.

use onceonly_certs::Participant;
use onceonly_proto::v1::{
    AuditRecord, CorrelationId, ExchangeOutcome, PreviewStep, RecordKind, SubjectId,
};
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

    /// The records matching `filter` that `keep` keeps, in log order, read in
    /// pages through the log's index; at most `most` of them, and whether
    /// more were left unread.
    pub async fn records_matching(
        &self,
        filter: crate::audit::AuditFilter,
        most: usize,
        keep: impl Fn(&onceonly_proto::v1::AuditRecord) -> bool,
    ) -> Result<(Vec<onceonly_proto::v1::AuditRecord>, bool), crate::audit::AuditError> {
        const PAGE: usize = 1000;
        let mut records = Vec::new();
        let mut start = 0;
        loop {
            let (page, next) = self.audit.query(filter.clone(), start, PAGE).await?;
            records.extend(page.into_iter().filter(|record| keep(record)));
            match next {
                Some(_) if records.len() >= most => return Ok((records, true)),
                Some(next) => start = next,
                None => return Ok((records, false)),
            }
        }
    }

    /// Records `step` of `caller`'s preview of the evidence its exchange
    /// `exchange_id` delivered about `subject`: NOT_FOUND, nothing
    /// recorded, where no such exchange of the caller's delivered evidence
    /// about this subject in the last 24 hours.
    pub async fn record_preview_step(
        &self,
        caller: &Participant,
        exchange_id: &str,
        subject: &SubjectId,
        step: PreviewStep,
        correlation_ids: Vec<CorrelationId>,
    ) -> Result<crate::storage::Appended, ServiceRefusal> {
        const LOOKED_BACK_SECONDS: i64 = 86_400;
        let pseudonym = self.pseudonyms.pseudonym(subject.scheme, &subject.value);
        let filter = crate::audit::AuditFilter {
            subject_pseudonym: Some(pseudonym.clone()),
            caller_id: Some(caller.spiffe_id()),
            received_after: Some(now_ms() / 1000 - LOOKED_BACK_SECONDS),
            ..Default::default()
        };
        // The exchange, and the steps recorded of it so far: all of them
        // where there are at most MOST_PREVIEW_RECORDS, else the reading
        // stopped early and the preview has had its share.
        let (found, _) = self
            .records_matching(filter, MOST_PREVIEW_RECORDS, |record| match record.kind() {
                RecordKind::Unspecified => {
                    record.exchange_id == exchange_id
                        && record.outcome() == ExchangeOutcome::Delivered
                }
                RecordKind::PreviewStep => record.preview_of_exchange_id == exchange_id,
                _ => false,
            })
            .await?;
        let Some(exchange) = found
            .iter()
            .find(|record| record.kind() == RecordKind::Unspecified)
            .cloned()
        else {
            return Err(ServiceRefusal::UnknownExchange(exchange_id.to_owned()));
        };
        if found.len() >= MOST_PREVIEW_RECORDS {
            return Err(ServiceRefusal::TooManySteps(MOST_PREVIEW_RECORDS - 1));
        }
        let last = found
            .iter()
            .rfind(|record| record.kind() == RecordKind::PreviewStep)
            .map(|record| record.preview_step());
        if !may_follow(last, step) {
            return Err(ServiceRefusal::StepOutOfOrder { last, step });
        }
        let record = AuditRecord {
            kind: RecordKind::PreviewStep as i32,
            preview_step: step as i32,
            preview_of_exchange_id: exchange.exchange_id,
            evidence_type: exchange.evidence_type,
            purpose: exchange.purpose,
            legal_basis: exchange.legal_basis,
            connector_id: exchange.connector_id,
            correlation_ids,
            ..self.access_record(RecordKind::PreviewStep, caller, subject, Access::default())
        };
        self.audit.append(record).await.map_err(|audit_error| {
            tracing::error!(%audit_error, ?step, caller = %caller, "preview step not recorded: refused");
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

/// The most records of one preview read back: its exchange and the steps
/// recorded of it; one step fewer than this may be recorded (a preview
/// needs a handful: SHOWN repeats only at each sign-in).
const MOST_PREVIEW_RECORDS: usize = 64;

/// Whether `step` may follow `last` in a preview: OFFERED first, SHOWN at
/// each sign-in, then ACCEPTED, DECLINED or EXPIRED (EXPIRED also straight
/// after OFFERED), and FORWARDED only after ACCEPTED, once. (Two steps of
/// one exchange recorded at the same moment are not ordered against each
/// other: the bridge records one step of a preview at a time.)
pub fn may_follow(last: Option<PreviewStep>, step: PreviewStep) -> bool {
    use PreviewStep as S;
    matches!(
        (last, step),
        (None, S::Offered)
            | (Some(S::Offered), S::Shown | S::Expired)
            | (
                Some(S::Shown),
                S::Shown | S::Accepted | S::Declined | S::Expired
            )
            | (Some(S::Accepted), S::Forwarded)
    )
}

#[cfg(test)]
mod tests {
    use super::may_follow;
    use onceonly_proto::v1::PreviewStep as S;

    #[test]
    fn a_preview_goes_offered_shown_decided_then_forwarded_only_if_accepted() {
        for (last, step, allowed) in [
            (None, S::Offered, true),
            (None, S::Shown, false),
            (None, S::Forwarded, false),
            (Some(S::Offered), S::Offered, false),
            (Some(S::Offered), S::Shown, true),
            (Some(S::Offered), S::Expired, true),
            (Some(S::Offered), S::Accepted, false),
            (Some(S::Shown), S::Shown, true),
            (Some(S::Shown), S::Accepted, true),
            (Some(S::Shown), S::Declined, true),
            (Some(S::Shown), S::Forwarded, false),
            (Some(S::Accepted), S::Forwarded, true),
            (Some(S::Accepted), S::Declined, false),
            (Some(S::Declined), S::Forwarded, false),
            (Some(S::Expired), S::Accepted, false),
            (Some(S::Forwarded), S::Forwarded, false),
        ] {
            assert_eq!(may_follow(last, step), allowed, "{step:?} after {last:?}");
        }
    }
}
