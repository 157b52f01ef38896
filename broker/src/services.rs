//! The broker's gRPC services: thin adapters from `onceonly.v1` to the
//! request path ([`crate::exchange`]), the consent store and the audit log.
//! Each method first checks the caller's role (from its certificate).

use std::sync::Arc;

use onceonly_certs::connection::CallStarted;
use onceonly_certs::{Participant, Role, peer_identity};
use onceonly_proto::v1::audit_service_server::AuditService;
use onceonly_proto::v1::consent_service_server::ConsentService;
use onceonly_proto::v1::evidence_service_server::EvidenceService;
use onceonly_proto::v1::*;
use onceonly_proto::validate::{self, FieldViolation, Violations};
use tonic::{Request, Response, Status};

use crate::access_log::Access;
use crate::audit::AuditFilter;
use crate::consent::{ConsentError, Consents, NewConsent, to_proto};
use crate::exchange::Broker;
use crate::refusal::ServiceRefusal;
use onceonly_proto::time::{millis, now_ms};

/// The longest a consent may be granted for.
const MAX_CONSENT_MS: i64 = 5 * 366 * 86_400_000;

/// The caller, if its certificate verified and its role is one of
/// `allowed`. A refused certificate is counted in `broker.security`, never
/// stored.
fn require_role<T>(
    broker: &Broker,
    request: &Request<T>,
    allowed: &'static [Role],
    what: &'static str,
) -> Result<Participant, ServiceRefusal> {
    let caller = peer_identity(request).map_err(|refusal| {
        broker.security.call_refused(refusal.kind);
        ServiceRefusal::Unauthenticated(refusal.reason.clone())
    })?;
    if allowed.contains(&caller.role()) {
        return Ok(caller.clone());
    }
    Err(ServiceRefusal::RoleNotPermitted {
        caller: caller.clone(),
        what,
        roles: allowed,
    })
}

/// `EvidenceService`, for authorities.
pub struct EvidenceGrpc(pub Arc<Broker>);

#[tonic::async_trait]
impl EvidenceService for EvidenceGrpc {
    async fn request_evidence(
        &self,
        request: Request<RequestEvidenceRequest>,
    ) -> Result<Response<RequestEvidenceResponse>, Status> {
        let peer = peer_identity(&request).cloned();
        let arrived = request.extensions().get::<CallStarted>().map(|c| c.0);
        let metadata = request.metadata().clone();
        self.0
            .request_evidence(peer, &metadata, arrived, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_evidence_types(
        &self,
        request: Request<ListEvidenceTypesRequest>,
    ) -> Result<Response<ListEvidenceTypesResponse>, Status> {
        let caller = require_role(&self.0, &request, &[Role::Authority], "EvidenceService")?;
        let allowed = self.0.policy.current().allowed_types(caller.id());
        let evidence_types = self
            .0
            .routing
            .evidence_types()
            .into_iter()
            .filter_map(|t| {
                allowed
                    .get(&t.entry.id)
                    .map(|consent_required| EvidenceTypeInfo {
                        consent_required: *consent_required,
                        ..t.info.clone()
                    })
            })
            .collect();
        Ok(Response::new(ListEvidenceTypesResponse { evidence_types }))
    }

    async fn record_preview_step(
        &self,
        request: Request<RecordPreviewStepRequest>,
    ) -> Result<Response<RecordPreviewStepResponse>, Status> {
        let caller = require_role(&self.0, &request, &[Role::Authority], "RecordPreviewStep")?;
        let step_request = request.into_inner();
        let step = PreviewStep::try_from(step_request.step)
            .ok()
            .filter(|s| *s != PreviewStep::Unspecified);
        let mut violations = Violations::new();
        violations
            .check(validate::subject(step_request.subject.as_ref(), "subject"))
            .check(validate::request_id(
                "exchange_id",
                &step_request.exchange_id,
            ))
            .check(validate::correlation_ids(
                "correlation_ids",
                &step_request.correlation_ids,
            ));
        if step.is_none() {
            violations.push(FieldViolation::new(
                "step",
                "name a step: OFFERED, SHOWN, ACCEPTED, DECLINED, EXPIRED or FORWARDED",
            ));
        }
        violations.into_result().map_err(ServiceRefusal::Invalid)?;
        let (Some(step), Some(subject)) = (step, step_request.subject) else {
            return Err(ServiceRefusal::invalid("step", "required").into());
        };
        let appended = self
            .0
            .record_preview_step(
                &caller,
                &step_request.exchange_id,
                &subject,
                step,
                step_request.correlation_ids,
            )
            .await?;
        Ok(Response::new(RecordPreviewStepResponse {
            audit_log_index: appended.index.unwrap_or_default(),
        }))
    }
}

/// `ConsentService`, for portals (and auditors, read-only).
pub struct ConsentGrpc(pub Arc<Broker>);

/// PERMISSION_DENIED where the policy limits `portal` to other evidence
/// types.
fn check_portal_scope(
    broker: &Broker,
    portal: &Participant,
    evidence_type: &str,
) -> Result<(), ServiceRefusal> {
    if broker
        .policy
        .current()
        .portal_may(portal.id(), evidence_type)
    {
        return Ok(());
    }
    Err(ServiceRefusal::PortalOutOfScope {
        portal: portal.clone(),
        evidence_type: evidence_type.to_owned(),
    })
}

#[tonic::async_trait]
impl ConsentService for ConsentGrpc {
    async fn grant_consent(
        &self,
        request: Request<GrantConsentRequest>,
    ) -> Result<Response<GrantConsentResponse>, Status> {
        let portal = require_role(&self.0, &request, &[Role::Portal], "GrantConsent")?;
        let grant = request.into_inner();
        let now = now_ms();
        let mut violations = Violations::new();
        violations
            .check(validate::subject(grant.subject.as_ref(), "subject"))
            .check(validate::required_text("purpose", &grant.purpose))
            .check(validate::evidence_type_id(
                "evidence_type",
                &grant.evidence_type,
            ));
        if violations.clone().into_result().is_ok()
            && self.0.routing.evidence_type(&grant.evidence_type).is_none()
        {
            violations.push(FieldViolation::new(
                "evidence_type",
                format!("{:?} is not in the catalogue", grant.evidence_type),
            ));
        }
        match grant.authority_id.parse::<Participant>() {
            Ok(p) if p.role() == Role::Authority && p.trust_domain() == portal.trust_domain() => {}
            Ok(p) => {
                violations.push(FieldViolation::new(
                    "authority_id",
                    format!(
                        "{p} is not an authority of trust domain {}",
                        portal.trust_domain()
                    ),
                ));
            }
            Err(e) => {
                violations.push(FieldViolation::new(
                    "authority_id",
                    format!("{e}; write spiffe://<trust-domain>/authority/<id>"),
                ));
            }
        }
        let expires_at_ms = grant.expires_at.as_ref().map(millis);
        match expires_at_ms {
            None => {
                violations.push(FieldViolation::new(
                    "expires_at",
                    "required: when the consent ends",
                ));
            }
            Some(t) if t <= now => {
                violations.push(FieldViolation::new("expires_at", "must be in the future"));
            }
            Some(t) if t - now > MAX_CONSENT_MS => {
                violations.push(FieldViolation::new("expires_at", "at most 5 years ahead"));
            }
            Some(_) => {}
        }
        violations.into_result().map_err(ServiceRefusal::Invalid)?;
        let subject = grant.subject.clone().unwrap_or_default();
        check_portal_scope(&self.0, &portal, &grant.evidence_type)?;
        // Recorded before it takes effect: no record, no consent.
        let consent_id = Consents::new_consent_id();
        let access = Access {
            consent_id: consent_id.clone(),
            evidence_type: grant.evidence_type.clone(),
            purpose: grant.purpose.clone(),
            consent_authority_id: grant.authority_id.clone(),
        };
        let new = NewConsent {
            subject: subject.clone(),
            authority_id: grant.authority_id,
            evidence_type: grant.evidence_type,
            purpose: grant.purpose,
            expires_at_ms: expires_at_ms.unwrap_or(now),
            recorded_by: portal.spiffe_id(),
        };
        let consent = self
            .0
            .change_consent(
                RecordKind::ConsentGranted,
                portal.clone(),
                subject.clone(),
                access,
                move |broker| async move { broker.consents.grant(consent_id, new, now).await },
            )
            .await?;
        tracing::info!(consent_id = %consent.consent_id, portal = %portal, "consent granted");
        Ok(Response::new(GrantConsentResponse {
            consent: Some(to_proto(&consent, now, subject)),
        }))
    }

    async fn revoke_consent(
        &self,
        request: Request<RevokeConsentRequest>,
    ) -> Result<Response<RevokeConsentResponse>, Status> {
        let portal = require_role(&self.0, &request, &[Role::Portal], "RevokeConsent")?;
        let id = request.into_inner().consent_id;
        if id.is_empty() {
            return Err(ServiceRefusal::invalid("consent_id", "required").into());
        }
        let now = now_ms();
        let stored = self
            .0
            .consents
            .get(&id)
            .await
            .map_err(ServiceRefusal::from)?
            .ok_or_else(|| ServiceRefusal::Consent(ConsentError::NotFound(id.clone())))?;
        check_portal_scope(&self.0, &portal, &stored.evidence_type)?;
        let subject = self
            .0
            .consents
            .subject_of(&stored)
            .map_err(ServiceRefusal::from)?;
        let access = Access {
            consent_id: id.clone(),
            evidence_type: stored.evidence_type.clone(),
            purpose: stored.purpose.clone(),
            consent_authority_id: stored.authority_id.clone(),
        };
        let revoked = id.clone();
        let consent = self
            .0
            .change_consent(
                RecordKind::ConsentRevoked,
                portal.clone(),
                subject.clone(),
                access,
                move |broker| async move { broker.consents.revoke(&revoked, now).await },
            )
            .await?;
        tracing::info!(consent_id = %id, portal = %portal, "consent revoked");
        Ok(Response::new(RevokeConsentResponse {
            consent: Some(to_proto(&consent, now, subject)),
        }))
    }

    async fn list_consents(
        &self,
        request: Request<ListConsentsRequest>,
    ) -> Result<Response<ListConsentsResponse>, Status> {
        let caller = require_role(
            &self.0,
            &request,
            &[Role::Portal, Role::Auditor],
            "ListConsents",
        )?;
        let list = request.into_inner();
        validate::subject(list.subject.as_ref(), "subject")
            .map_err(|v| ServiceRefusal::Invalid(vec![v]))?;
        let skip = parse_page_token(&list.page_token)?;
        let limit = page_size(list.page_size, 50, 500);
        let subject = list.subject.unwrap_or_default();
        self.0
            .record_access(
                RecordKind::ConsentsListed,
                &caller,
                &subject,
                Access::default(),
            )
            .await?;
        let (consents, more) = self
            .0
            .consents
            .list(&subject, usize::try_from(skip).unwrap_or(usize::MAX), limit)
            .await
            .map_err(ServiceRefusal::from)?;
        let now = now_ms();
        let next_page_token = if more {
            (skip + consents.len() as u64).to_string()
        } else {
            String::new()
        };
        Ok(Response::new(ListConsentsResponse {
            consents: consents
                .iter()
                .map(|c| to_proto(c, now, subject.clone()))
                .collect(),
            next_page_token,
        }))
    }
}

fn page_size(asked: u32, default: usize, max: usize) -> usize {
    match asked {
        0 => default,
        n => (n as usize).min(max),
    }
}

fn parse_page_token(token: &str) -> Result<u64, ServiceRefusal> {
    if token.is_empty() {
        return Ok(0);
    }
    token.parse().map_err(|_| {
        ServiceRefusal::invalid(
            "page_token",
            "not a token this service issued; pass next_page_token unchanged",
        )
    })
}

/// `AuditService`: record queries scoped by role. Tree heads and proofs
/// arrive with the tamper-evident log.
pub struct AuditGrpc(pub Arc<Broker>);

#[tonic::async_trait]
impl AuditService for AuditGrpc {
    async fn query_records(
        &self,
        request: Request<QueryRecordsRequest>,
    ) -> Result<Response<QueryRecordsResponse>, Status> {
        let caller = require_role(
            &self.0,
            &request,
            &[Role::Auditor, Role::Portal, Role::Authority],
            "QueryRecords",
        )?;
        let query = request.into_inner();
        let mut filter = AuditFilter {
            caller_id: Some(query.caller_id.clone()).filter(|c| !c.is_empty()),
            evidence_type: Some(query.evidence_type.clone()).filter(|e| !e.is_empty()),
            connector_id: Some(query.connector_id.clone()).filter(|c| !c.is_empty()),
            outcome: ExchangeOutcome::try_from(query.outcome)
                .ok()
                .filter(|o| *o != ExchangeOutcome::Unspecified),
            received_after: query.received_after.as_ref().map(|t| t.seconds),
            received_before: query.received_before.as_ref().map(|t| t.seconds),
            subject_pseudonym: None,
        };
        if let Some(subject) = &query.subject {
            validate::subject(Some(subject), "subject")
                .map_err(|v| ServiceRefusal::Invalid(vec![v]))?;
            filter.subject_pseudonym =
                Some(self.0.pseudonyms.pseudonym(subject.scheme, &subject.value));
        }
        match caller.role() {
            Role::Portal if filter.subject_pseudonym.is_none() => {
                return Err(ServiceRefusal::invalid(
                    "subject",
                    "required for a portal: the transparency view shows one person's records",
                )
                .into());
            }
            Role::Authority => {
                let own = caller.spiffe_id();
                if filter.caller_id.as_ref().is_some_and(|c| *c != own) {
                    return Err(ServiceRefusal::OthersRecords.into());
                }
                filter.caller_id = Some(own);
            }
            _ => {}
        }
        let start = parse_page_token(&query.page_token)?;
        let limit = page_size(query.page_size, 100, 1000);
        // Reading a subject's history is itself recorded, before the answer.
        if let Some(subject) = &query.subject {
            self.0
                .record_access(RecordKind::HistoryRead, &caller, subject, Access::default())
                .await?;
        }
        let (records, next) = self
            .0
            .audit
            .query(filter, start, limit)
            .await
            .map_err(ServiceRefusal::from)?;
        Ok(Response::new(QueryRecordsResponse {
            records,
            next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }

    async fn get_signed_tree_head(
        &self,
        request: Request<GetSignedTreeHeadRequest>,
    ) -> Result<Response<GetSignedTreeHeadResponse>, Status> {
        require_role(
            &self.0,
            &request,
            &[Role::Auditor, Role::Portal, Role::Authority],
            "GetSignedTreeHead",
        )?;
        let head = self
            .0
            .audit
            .signed_tree_head()
            .await
            .map_err(ServiceRefusal::from)?;
        Ok(Response::new(GetSignedTreeHeadResponse {
            tree_head: head.as_ref().map(crate::audit::head_to_proto),
        }))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<GetInclusionProofRequest>,
    ) -> Result<Response<GetInclusionProofResponse>, Status> {
        require_role(
            &self.0,
            &request,
            &[Role::Auditor, Role::Portal, Role::Authority],
            "GetInclusionProof",
        )?;
        let mut ask = request.into_inner();
        if !ask.leaf_hash.is_empty() {
            // By hash (a receipt's), as RFC 6962's get-proof-by-hash.
            let wanted: onceonly_merkle::Hash =
                ask.leaf_hash.as_slice().try_into().map_err(|_| {
                    ServiceRefusal::invalid(
                        "leaf_hash",
                        format!("is {} bytes; a leaf hash is 32", ask.leaf_hash.len()),
                    )
                })?;
            ask.leaf_index = self
                .0
                .audit
                .find_leaf(&wanted, ask.tree_size)
                .await
                .map_err(ServiceRefusal::from)?
                .ok_or(ServiceRefusal::LeafNotFound {
                    tree_size: ask.tree_size,
                })?;
        }
        if ask.leaf_index >= ask.tree_size {
            return Err(ServiceRefusal::invalid(
                "leaf_index",
                format!("must be below tree_size {}", ask.tree_size),
            )
            .into());
        }
        let (audit_path, leaf_hash) = self
            .0
            .audit
            .inclusion_proof(ask.leaf_index, ask.tree_size)
            .await
            .map_err(ServiceRefusal::from)?;
        Ok(Response::new(GetInclusionProofResponse {
            leaf_index: ask.leaf_index,
            tree_size: ask.tree_size,
            audit_path: audit_path.iter().map(|h| h.to_vec()).collect(),
            leaf_hash: leaf_hash.to_vec(),
        }))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<GetConsistencyProofRequest>,
    ) -> Result<Response<GetConsistencyProofResponse>, Status> {
        require_role(
            &self.0,
            &request,
            &[Role::Auditor, Role::Portal, Role::Authority],
            "GetConsistencyProof",
        )?;
        let ask = request.into_inner();
        if ask.first_size > ask.second_size {
            return Err(
                ServiceRefusal::invalid("first_size", "must not exceed second_size").into(),
            );
        }
        let proof = self
            .0
            .audit
            .consistency_proof(ask.first_size, ask.second_size)
            .await
            .map_err(ServiceRefusal::from)?;
        Ok(Response::new(GetConsistencyProofResponse {
            first_size: ask.first_size,
            second_size: ask.second_size,
            proof: proof.iter().map(|h| h.to_vec()).collect(),
        }))
    }

    async fn get_entries(
        &self,
        request: Request<GetEntriesRequest>,
    ) -> Result<Response<GetEntriesResponse>, Status> {
        require_role(&self.0, &request, &[Role::Auditor], "GetEntries")?;
        let ask = request.into_inner();
        let max = page_size(ask.max_entries, 100, 1000) as u64;
        let entries = self
            .0
            .audit
            .entries(ask.start_index, max)
            .await
            .map_err(ServiceRefusal::from)?
            .into_iter()
            .map(|(leaf_index, record, leaf_data)| LogEntry {
                leaf_index,
                leaf_data,
                record: Some(record),
            })
            .collect();
        Ok(Response::new(GetEntriesResponse { entries }))
    }
}
