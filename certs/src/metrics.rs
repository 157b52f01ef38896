//! What a server's TLS files say about time, as metrics on its admin
//! listener: the broker and every connector built on the SDK report the
//! same names, so one set of alert rules (`deploy/alerts.yml`) watches both
//! their certificates and the revocation list they check against.
//!
//! - `onceonly_certificate_expiry_seconds{certificate="<own>"|"ca"}`:
//!   seconds until the server's own certificate (`broker`, `connector`) and
//!   the CA's expire;
//! - `onceonly_crl_age_seconds`, `onceonly_crl_next_update_seconds`: the
//!   CRL's age and the time to its `nextUpdate` (negative: stale).
//!
//! Read from the files in use at each scrape, so a reload shows at once.

use std::path::Path;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

use crate::ReloadableServerTls;

/// The certificate and CRL lifetimes of one server's TLS files.
#[derive(Debug)]
pub struct TlsLifetimes {
    tls: Arc<ReloadableServerTls>,
    own: &'static str,
}

impl TlsLifetimes {
    /// Reports `tls`'s files; `own` labels the server's own certificate
    /// (`broker`, `connector`).
    pub fn new(tls: Arc<ReloadableServerTls>, own: &'static str) -> Self {
        TlsLifetimes { tls, own }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabel {
    certificate: String,
}

/// Encodes one gauge without labels (a helper for collectors of state read
/// at each scrape).
pub fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for TlsLifetimes {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let files = self.tls.files();
        {
            let mut family = encoder.encode_descriptor(
                "onceonly_certificate_expiry_seconds",
                "Seconds until this server's own certificate and the CA expire",
                None,
                ConstGauge::new(0.0).metric_type(),
            )?;
            for (which, path) in [(self.own, &files.cert), ("ca", &files.ca)] {
                if let Some(not_after) = not_after(path) {
                    let labels = CertificateLabel {
                        certificate: which.to_owned(),
                    };
                    ConstGauge::new((not_after - now) as f64)
                        .encode(family.encode_family(&labels)?)?;
                }
            }
        }
        if let Some(crl) = &files.crl
            && let Some((this_update, next_update)) = crl_times(crl)
        {
            gauge(
                &mut encoder,
                "onceonly_crl_age_seconds",
                "Seconds since the revocation list in use was issued",
                (now - this_update) as f64,
            )?;
            gauge(
                &mut encoder,
                "onceonly_crl_next_update_seconds",
                "Seconds until the revocation list's nextUpdate (negative: stale)",
                next_update.map_or(f64::INFINITY, |next| (next - now) as f64),
            )?;
        }
        Ok(())
    }
}

/// A certificate file's `notAfter` (Unix seconds).
fn not_after(path: &Path) -> Option<i64> {
    let cert = crate::pki::load_certs(path).ok()?.into_iter().next()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// A CRL file's `thisUpdate` and `nextUpdate` (Unix seconds).
fn crl_times(path: &Path) -> Option<(i64, Option<i64>)> {
    let crl = crate::pki::load_crl(path).ok()?;
    let (_, parsed) = x509_parser::parse_x509_crl(crl.as_ref()).ok()?;
    Some((
        parsed.last_update().timestamp(),
        parsed.next_update().map(|t| t.timestamp()),
    ))
}
