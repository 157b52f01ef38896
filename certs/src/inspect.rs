//! What `onceonly-certs inspect` prints: a certificate's identity, role,
//! validity, serial and fingerprint.

use std::fmt;

use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::identity::Participant;
use crate::pki::{PkiError, fingerprint};

/// A certificate, summarised for a person or a script.
#[derive(Debug, Clone, Serialize)]
pub struct CertificateSummary {
    /// The SPIFFE id, or why there is none usable.
    pub identity: Result<String, String>,
    /// The role, where the identity is valid.
    pub role: Option<String>,
    /// The participant id, where the identity is valid.
    pub id: Option<String>,
    /// Subject distinguished name.
    pub subject: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Serial, lower-case hex.
    pub serial: String,
    /// Start of validity (RFC 3339).
    pub not_before: String,
    /// End of validity (RFC 3339).
    pub not_after: String,
    /// Whether now is inside the validity period.
    pub currently_valid: bool,
    /// SHA-256 over the DER certificate, hex.
    pub sha256_fingerprint: String,
    /// Whether the certificate is a CA.
    pub is_ca: bool,
    /// DNS names and IP addresses it covers.
    pub server_names: Vec<String>,
}

impl CertificateSummary {
    /// Summarises a DER certificate.
    pub fn of(der: &[u8]) -> Result<Self, PkiError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Malformed {
                path: "<certificate>".into(),
                reason: e.to_string(),
            })?;
        let identity = Participant::from_certificate(der);
        let validity = cert.validity();
        let when = |t: x509_parser::time::ASN1Time| {
            OffsetDateTime::from_unix_timestamp(t.timestamp())
                .ok()
                .and_then(|t| t.format(&Rfc3339).ok())
                .unwrap_or_else(|| t.to_string())
        };
        let mut server_names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => {
                        server_names.push((*dns).to_owned())
                    }
                    x509_parser::extensions::GeneralName::IPAddress(ip) => {
                        server_names.push(ip_to_string(ip))
                    }
                    _ => {}
                }
            }
        }
        Ok(CertificateSummary {
            role: identity.as_ref().ok().map(|p| p.role().to_string()),
            id: identity.as_ref().ok().map(|p| p.id().to_owned()),
            identity: identity.map(|p| p.spiffe_id()).map_err(|e| e.to_string()),
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: cert.raw_serial_as_string().replace(':', ""),
            not_before: when(validity.not_before),
            not_after: when(validity.not_after),
            currently_valid: validity.is_valid(),
            sha256_fingerprint: fingerprint(der),
            is_ca: cert.is_ca(),
            server_names,
        })
    }
}

fn ip_to_string(bytes: &[u8]) -> String {
    match bytes.len() {
        4 => std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string(),
        16 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(bytes);
            std::net::Ipv6Addr::from(octets).to_string()
        }
        _ => hex::encode(bytes),
    }
}

impl fmt::Display for CertificateSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.identity {
            Ok(id) => writeln!(f, "identity     {id}")?,
            Err(why) => writeln!(f, "identity     NONE USABLE: {why}")?,
        }
        if let (Some(role), Some(id)) = (&self.role, &self.id) {
            writeln!(f, "role         {role}")?;
            writeln!(f, "id           {id}")?;
        }
        writeln!(f, "subject      {}", self.subject)?;
        writeln!(f, "issuer       {}", self.issuer)?;
        writeln!(f, "serial       {}", self.serial)?;
        writeln!(
            f,
            "valid        {} .. {} ({})",
            self.not_before,
            self.not_after,
            if self.currently_valid {
                "valid now"
            } else {
                "NOT valid now"
            }
        )?;
        if !self.server_names.is_empty() {
            writeln!(f, "server names {}", self.server_names.join(", "))?;
        }
        if self.is_ca {
            writeln!(f, "CA           yes")?;
        }
        write!(f, "sha256       {}", self.sha256_fingerprint)
    }
}
