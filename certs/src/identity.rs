//! Participant identity: who a certificate belongs to and in what role.
//!
//! Every participant's certificate carries exactly one URI SAN of the form
//! `spiffe://<trust-domain>/<role>/<id>`. This module is the one place that
//! turns a certificate into a [`Participant`]; the broker and the connector
//! SDK use it and nothing else. [`IdentityVerifier`] adds the chain, validity
//! and revocation checks, with exactly the rustls verifier the TLS handshake
//! uses, so an offline check and a handshake can never disagree.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::security::RefusalKind;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use x509_parser::extensions::GeneralName;

/// The longest participant id we accept.
pub const MAX_ID_LEN: usize = 128;

/// The role a participant plays, the second-to-last SPIFFE path segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A requesting authority's specialist application (EvidenceService).
    Authority,
    /// A register's connector (serves ConnectorService, called by the broker).
    Connector,
    /// An auditor or data-protection officer (AuditService).
    Auditor,
    /// A citizen portal (ConsentService, the transparency view).
    Portal,
    /// The broker itself.
    Broker,
    /// The broker's operator.
    Admin,
    /// Policy staff: the people who turn law into the broker's policy,
    /// and apply it through the console.
    PolicyAdmin,
}

impl Role {
    /// Every role, in a fixed order.
    pub const ALL: [Role; 7] = [
        Role::Authority,
        Role::Connector,
        Role::Auditor,
        Role::Portal,
        Role::Broker,
        Role::Admin,
        Role::PolicyAdmin,
    ];

    /// The role's name as it appears in SPIFFE ids.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Authority => "authority",
            Role::Connector => "connector",
            Role::Auditor => "auditor",
            Role::Portal => "portal",
            Role::Broker => "broker",
            Role::Admin => "admin",
            Role::PolicyAdmin => "policy-admin",
        }
    }

    /// Whether participants of this role run a server other participants
    /// connect to, and so need DNS/IP names in their certificate.
    pub fn serves(self) -> bool {
        matches!(self, Role::Broker | Role::Connector)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == s)
            .ok_or_else(|| IdentityError::UnknownRole(s.to_owned()))
    }
}

/// A participant: a trust domain, a role and an id, e.g.
/// `spiffe://onceonly.test/authority/elterngeld-berlin`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Participant {
    trust_domain: String,
    role: Role,
    id: String,
}

impl Participant {
    /// Builds a participant, checking each part.
    pub fn new(trust_domain: &str, role: Role, id: &str) -> Result<Self, IdentityError> {
        validate_trust_domain(trust_domain)?;
        validate_id(id)?;
        Ok(Participant {
            trust_domain: trust_domain.to_owned(),
            role,
            id: id.to_owned(),
        })
    }

    /// The trust domain, e.g. `onceonly.test`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The id within the role, e.g. `elterngeld-berlin`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The SPIFFE id, e.g. `spiffe://onceonly.test/authority/elterngeld-berlin`.
    pub fn spiffe_id(&self) -> String {
        self.to_string()
    }

    /// Reads the participant from a DER certificate: it must carry exactly
    /// one `spiffe://` URI SAN, of the form `spiffe://<td>/<role>/<id>`.
    /// Checks nothing about the chain; see [`IdentityVerifier`] for that.
    pub fn from_certificate(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::Unparseable(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::Unparseable(e.to_string()))?;
        let spiffe_uris: Vec<&str> = san
            .iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|name| match name {
                GeneralName::URI(uri) if uri.to_ascii_lowercase().starts_with("spiffe:") => {
                    Some(*uri)
                }
                _ => None,
            })
            .collect();
        match spiffe_uris.as_slice() {
            [] => Err(IdentityError::NoSpiffeId),
            [one] => one.parse(),
            many => Err(IdentityError::SeveralSpiffeIds(
                many.iter().map(|uri| (*uri).to_owned()).collect(),
            )),
        }
    }
}

impl fmt::Display for Participant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/{}/{}",
            self.trust_domain, self.role, self.id
        )
    }
}

impl FromStr for Participant {
    type Err = IdentityError;

    /// Parses `spiffe://<trust-domain>/<role>/<id>`.
    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let malformed = |reason: &str| IdentityError::MalformedSpiffeId {
            uri: uri.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| malformed("must start with spiffe://"))?;
        if rest.contains(['?', '#']) {
            return Err(malformed("must not have a query or fragment"));
        }
        let mut parts = rest.split('/');
        let (Some(trust_domain), Some(role), Some(id), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed(
                "must have exactly two path segments: /<role>/<id>",
            ));
        };
        let role = role.parse()?;
        Participant::new(trust_domain, role, id)
    }
}

/// Checks a trust domain name: lower-case letters, digits, '.', '-', '_'.
pub fn validate_trust_domain(trust_domain: &str) -> Result<(), IdentityError> {
    let ok = !trust_domain.is_empty()
        && trust_domain.len() <= 255
        && trust_domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::InvalidTrustDomain(trust_domain.to_owned()))
    }
}

/// Checks a participant id: 1 to 128 letters, digits, '.', '-', '_', not
/// `.` or `..`.
pub fn validate_id(id: &str) -> Result<(), IdentityError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::InvalidId(id.to_owned()))
    }
}

/// Why a certificate does not give a usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The certificate is not valid DER X.509.
    #[error("certificate cannot be parsed: {0}")]
    Unparseable(String),
    /// No `spiffe://` URI SAN.
    #[error(
        "certificate carries no SPIFFE id (a URI SAN spiffe://<trust-domain>/<role>/<id>); issue it with `onceonly-certs issue`"
    )]
    NoSpiffeId,
    /// More than one `spiffe://` URI SAN: ambiguous, so refused.
    #[error("certificate carries {} SPIFFE ids ({}); exactly one is allowed", .0.len(), .0.join(", "))]
    SeveralSpiffeIds(Vec<String>),
    /// The SPIFFE URI is not of our form.
    #[error("SPIFFE id {uri:?} is malformed: {reason}")]
    MalformedSpiffeId {
        /// The URI as found.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The role segment is not one of ours.
    #[error(
        "unknown role {0:?}; expected one of authority, connector, auditor, portal, broker, admin"
    )]
    UnknownRole(String),
    /// The trust domain has characters SPIFFE does not allow.
    #[error("invalid trust domain {0:?}: use lower-case letters, digits, '.', '-' and '_'")]
    InvalidTrustDomain(String),
    /// The id has characters we do not allow.
    #[error("invalid participant id {0:?}: use 1 to 128 letters, digits, '.', '-' and '_'")]
    InvalidId(String),
    /// The identity belongs to another trust domain.
    #[error("certificate belongs to trust domain {found:?}, expected {expected:?}")]
    ForeignTrustDomain {
        /// The trust domain we serve.
        expected: String,
        /// The one in the certificate.
        found: String,
    },
    /// Chain, validity or revocation check failed.
    #[error("certificate rejected: {0}")]
    Rejected(String),
    /// The certificate failed chain, validity or revocation checks.
    #[error("{reason}")]
    Certificate {
        /// The class of failure, for counting.
        kind: RefusalKind,
        /// What a person reads.
        reason: String,
    },
}

/// Explains a rustls certificate error the way an operator needs to read it.
pub fn explain_tls_error(error: &rustls::Error) -> String {
    match error {
        rustls::Error::InvalidCertificate(cert_error) => match cert_error {
            CertificateError::UnknownIssuer => {
                "certificate is not issued by this trust domain's CA (unknown issuer)".into()
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("certificate has expired ({cert_error:?})")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("certificate is not valid yet; check the clocks ({cert_error:?})")
            }
            CertificateError::Revoked => "certificate has been revoked".into(),
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => {
                "the revocation list is past its nextUpdate, so no certificate can be trusted until the operator publishes a fresh one (onceonly-certs refresh-crl) and reloads".into()
            }
            CertificateError::UnknownRevocationStatus => {
                "certificate's revocation status is unknown (no CRL of its issuer)".into()
            }
            CertificateError::BadSignature => {
                "certificate's signature does not verify against this trust domain's CA (issued by another CA of the same name?)".into()
            }
            CertificateError::Other(other) => other.to_string(),
            other => format!("{other:?}"),
        },
        rustls::Error::NoCertificatesPresented => "no client certificate presented".into(),
        other => other.to_string(),
    }
}

/// The class of a certificate failure, for counting.
pub fn refusal_kind(error: &rustls::Error) -> RefusalKind {
    match error {
        rustls::Error::InvalidCertificate(cert_error) => match cert_error {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                RefusalKind::UntrustedIssuer
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => RefusalKind::Expired,
            CertificateError::Revoked => RefusalKind::Revoked,
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => RefusalKind::CrlStale,
            _ => RefusalKind::OtherCertificate,
        },
        rustls::Error::NoCertificatesPresented => RefusalKind::NoCertificate,
        _ => RefusalKind::OtherCertificate,
    }
}

impl IdentityError {
    /// The class of this failure, for counting.
    pub fn refusal_kind(&self) -> RefusalKind {
        match self {
            IdentityError::Certificate { kind, .. } => *kind,
            IdentityError::Rejected(_) | IdentityError::Unparseable(_) => {
                RefusalKind::OtherCertificate
            }
            _ => RefusalKind::BadIdentity,
        }
    }
}

/// Verifies a client certificate chain against the trust domain's roots and
/// revocation list, then reads its identity. Also usable as the rustls
/// [`ClientCertVerifier`] of a server, so that a certificate without a valid
/// identity of our trust domain fails the handshake itself.
#[derive(Debug)]
pub struct IdentityVerifier {
    trust_domain: String,
    webpki: Arc<dyn ClientCertVerifier>,
    /// The revocation list's `nextUpdate` (Unix seconds), if it has one.
    crl_next_update: Option<i64>,
    /// Whether a list past its `nextUpdate` refuses every certificate.
    refuse_when_stale: bool,
    /// Why every certificate is refused whatever the list says: the list
    /// is older than one accepted before (rolled back).
    crl_rolled_back: Option<String>,
    /// Chains of signers verified lately ([`IdentityVerifier::verify_signer`]).
    signers:
        std::sync::Mutex<std::collections::HashMap<[u8; 32], (Participant, std::time::Instant)>>,
}

/// How long a signer's verified chain is taken as verified without checking
/// it again: a reload (a new CRL) starts a new verifier with none, and a
/// list going stale by the clock is noticed within this time.
pub const SIGNER_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(10);
/// Signers' chains remembered at most (one per broker and connector
/// certificate in use; more only under attack, and then forgotten).
const SIGNER_CACHE_MAX: usize = 4096;

/// The state of a verifier's revocation list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrlState {
    /// No list (an explicit opt-out).
    None,
    /// Current until `next_update` (Unix seconds; none given: current).
    Fresh {
        /// When it goes stale.
        next_update: Option<i64>,
    },
    /// Older (by number) than a list accepted before: every certificate is
    /// refused until a newer one is loaded (the reason was logged when it
    /// was loaded).
    RolledBack,
    /// Past its `next_update`.
    Stale {
        /// When it went stale.
        next_update: i64,
        /// Whether certificates are refused meanwhile.
        refusing: bool,
    },
}

impl IdentityVerifier {
    /// A verifier for `trust_domain`, trusting `roots` and refusing every
    /// serial on the `crls`.
    pub fn new(
        trust_domain: &str,
        roots: Vec<CertificateDer<'static>>,
        crls: Vec<CertificateRevocationListDer<'static>>,
    ) -> Result<Self, IdentityError> {
        Self::with_crl_policy(trust_domain, roots, crls, true)
    }

    /// Like [`IdentityVerifier::new`]; `refuse_when_stale` makes a list past
    /// its `nextUpdate` refuse every certificate (otherwise it is still
    /// used, and [`IdentityVerifier::crl_state`] reports it stale).
    pub fn with_crl_policy(
        trust_domain: &str,
        roots: Vec<CertificateDer<'static>>,
        crls: Vec<CertificateRevocationListDer<'static>>,
        refuse_when_stale: bool,
    ) -> Result<Self, IdentityError> {
        let crl_next_update = crls
            .iter()
            .filter_map(|crl| crl_next_update(crl.as_ref()))
            .min();
        validate_trust_domain(trust_domain)?;
        let mut store = RootCertStore::empty();
        for root in roots {
            store
                .add(root)
                .map_err(|e| IdentityError::Rejected(format!("unusable CA certificate: {e}")))?;
        }
        let mut builder = WebPkiClientVerifier::builder_with_provider(
            Arc::new(store),
            Arc::new(rustls::crypto::ring::default_provider()),
        );
        let has_crls = !crls.is_empty();
        if has_crls {
            builder = builder
                .with_crls(crls)
                .only_check_end_entity_revocation()
                .allow_unknown_revocation_status();
            if refuse_when_stale {
                builder = builder.enforce_revocation_expiration();
            }
        }
        let webpki = builder
            .build()
            .map_err(|e| IdentityError::Rejected(format!("cannot build verifier: {e}")))?;
        Ok(IdentityVerifier {
            trust_domain: trust_domain.to_owned(),
            webpki,
            crl_next_update: if has_crls { crl_next_update } else { None },
            refuse_when_stale: refuse_when_stale && has_crls,
            crl_rolled_back: None,
            signers: Default::default(),
        })
    }

    /// This verifier refusing every certificate, for `reason`: its
    /// revocation list is older than one accepted before, so nobody can
    /// tell who was revoked since ([`CrlState::RolledBack`]).
    pub fn refusing_all(mut self, reason: String) -> Self {
        self.crl_rolled_back = Some(reason);
        self
    }

    /// [`Self::verify`] for the signer of a token (a ticket, a statement):
    /// the same chain is verified once per [`SIGNER_CACHE_TTL`], since
    /// every token of one broker or connector carries the same chain and a
    /// chain check costs more than the signature's.
    pub fn verify_signer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<Participant, IdentityError> {
        self.cached(b"signer", end_entity, intermediates, || {
            self.verify(end_entity, intermediates)
        })
    }

    /// [`Self::verify_encryption_certificate`], cached like
    /// [`Self::verify_signer`]: an authority names the same certificate in
    /// request after request.
    pub fn verify_encryption_certificate_cached(
        &self,
        end_entity: &CertificateDer<'_>,
    ) -> Result<Participant, IdentityError> {
        self.cached(b"encryption", end_entity, &[], || {
            self.verify_encryption_certificate(end_entity)
        })
    }

    fn cached(
        &self,
        purpose: &[u8],
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        verify: impl FnOnce() -> Result<Participant, IdentityError>,
    ) -> Result<Participant, IdentityError> {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        hash.update(purpose);
        for cert in std::iter::once(end_entity).chain(intermediates) {
            hash.update((cert.len() as u64).to_be_bytes());
            hash.update(cert.as_ref());
        }
        let key: [u8; 32] = hash.finalize().into();
        let now = std::time::Instant::now();
        {
            let cache = self.signers.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((participant, verified_at)) = cache.get(&key)
                && now.duration_since(*verified_at) < SIGNER_CACHE_TTL
            {
                return Ok(participant.clone());
            }
        }
        let participant = verify()?;
        let mut cache = self.signers.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= SIGNER_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, (participant.clone(), now));
        Ok(participant)
    }

    /// The state of the revocation list at `now` (Unix seconds).
    pub fn crl_state(&self, now: i64, has_crl: bool) -> CrlState {
        if !has_crl {
            return CrlState::None;
        }
        if self.crl_rolled_back.is_some() {
            return CrlState::RolledBack;
        }
        match self.crl_next_update {
            Some(next_update) if next_update <= now => CrlState::Stale {
                next_update,
                refusing: self.refuse_when_stale,
            },
            next_update => CrlState::Fresh { next_update },
        }
    }

    /// The trust domain this verifier accepts.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Checks chain, validity at `now` and revocation, then the identity,
    /// of a certificate that authenticates (TLS, a signature): one whose
    /// key usage is key agreement only (an encryption certificate) is
    /// refused.
    pub fn verify_at(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<Participant, IdentityError> {
        self.check_chain(end_entity, intermediates, now)?;
        refuse_key_agreement_only(end_entity)?;
        self.identity_of(end_entity)
    }

    /// Checks an encryption certificate: chain, validity and revocation
    /// like [`Self::verify_at`], then the identity; its key usage is the
    /// caller's to check (key agreement).
    pub fn verify_encryption_certificate(
        &self,
        end_entity: &CertificateDer<'_>,
    ) -> Result<Participant, IdentityError> {
        self.check_chain(end_entity, &[], UnixTime::now())?;
        self.identity_of(end_entity)
    }

    fn check_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), IdentityError> {
        if let Some(reason) = &self.crl_rolled_back {
            return Err(IdentityError::Certificate {
                kind: RefusalKind::CrlStale,
                reason: reason.clone(),
            });
        }
        self.webpki
            .verify_client_cert(end_entity, intermediates, now)
            .map(|_| ())
            .map_err(|e| IdentityError::Certificate {
                kind: refusal_kind(&e),
                reason: explain_tls_error(&e),
            })
    }

    /// [`Self::verify_at`] the current time.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<Participant, IdentityError> {
        self.verify_at(end_entity, intermediates, UnixTime::now())
    }

    /// Reads the identity and checks its trust domain, without chain checks
    /// (for a certificate the TLS handshake has already verified).
    pub fn identity_of(
        &self,
        end_entity: &CertificateDer<'_>,
    ) -> Result<Participant, IdentityError> {
        let participant = Participant::from_certificate(end_entity)?;
        if participant.trust_domain() != self.trust_domain {
            return Err(IdentityError::ForeignTrustDomain {
                expected: self.trust_domain.clone(),
                found: participant.trust_domain().to_owned(),
            });
        }
        Ok(participant)
    }
}

/// Refuses a certificate whose key usage allows key agreement but not
/// signatures: an authority's encryption certificate, which must not log in
/// as the authority (webpki checks extended key usage only, and an
/// encryption certificate has none).
fn refuse_key_agreement_only(end_entity: &CertificateDer<'_>) -> Result<(), IdentityError> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(end_entity.as_ref()) else {
        return Ok(()); // unparseable certificates fail the identity check
    };
    match cert.key_usage() {
        Ok(Some(usage)) if !usage.value.digital_signature() => Err(IdentityError::Rejected(
            "the certificate's key usage does not include digitalSignature (an encryption certificate cannot authenticate)".into(),
        )),
        _ => Ok(()),
    }
}

impl ClientCertVerifier for IdentityVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.crl_rolled_back.is_some() {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ExpiredRevocationList,
            ));
        }
        let verified = self
            .webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        refuse_key_agreement_only(end_entity)
            .and_then(|()| self.identity_of(end_entity))
            .map_err(|e| {
                rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                    Arc::new(e),
                )))
            })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The `nextUpdate` of a DER revocation list (Unix seconds), if it has one.
pub fn crl_next_update(der: &[u8]) -> Option<i64> {
    let (_, crl) = x509_parser::parse_x509_crl(der).ok()?;
    crl.next_update().map(|t| t.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_id_round_trips() {
        let p: Participant = "spiffe://onceonly.test/authority/elterngeld-berlin"
            .parse()
            .expect("valid id");
        assert_eq!(p.role(), Role::Authority);
        assert_eq!(p.id(), "elterngeld-berlin");
        assert_eq!(p.trust_domain(), "onceonly.test");
        assert_eq!(
            p.to_string(),
            "spiffe://onceonly.test/authority/elterngeld-berlin"
        );
    }

    #[test]
    fn malformed_spiffe_ids_are_rejected() {
        for bad in [
            "https://onceonly.test/authority/x",
            "spiffe://onceonly.test/authority",
            "spiffe://onceonly.test/authority/x/y",
            "spiffe://onceonly.test/wizard/x",
            "spiffe://Onceonly.test/authority/x",
            "spiffe://onceonly.test/authority/..",
            "spiffe://onceonly.test/authority/",
            "spiffe://onceonly.test/authority/a b",
            "spiffe://onceonly.test/authority/x?y=1",
            "spiffe:///authority/x",
        ] {
            assert!(bad.parse::<Participant>().is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn every_role_parses_back() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
    }
}
