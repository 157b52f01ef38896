//! Who is looking, and whether a change really comes from the console.
//!
//! A person is the client certificate their browser presented: the
//! broker's verifier judged it in the handshake (trust domain, revocation
//! list) and judges the connection again when the list or the certificate's
//! lifetime changes. No certificate, a refused one, or a role the page is
//! not for: a page saying which, and nothing else.
//!
//! Browsers send client certificates with every request, whichever site
//! made the browser send it; so every change (a POST) must prove it came
//! from a console page: its `Origin` (and `Sec-Fetch-Site`, where the
//! browser sends it) must be the console's own, and its form must carry
//! the person's CSRF token, an HMAC of their SPIFFE id under a key drawn
//! at start.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::Response;
use onceonly_certs::connection::PeerIdentity;
use onceonly_certs::{Participant, Role};

use super::Console;
use super::page::{Lang, refused};

/// The person looking at a page: their verified certificate, and the
/// language the page is in.
#[derive(Debug, Clone)]
pub struct Viewer {
    /// Who, from their certificate.
    pub who: Participant,
    /// Which language.
    pub lang: Lang,
    /// Their CSRF token, for the forms of the page.
    pub csrf: String,
}

impl FromRequestParts<Arc<Console>> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &Arc<Console>,
    ) -> Result<Self, Self::Rejection> {
        let lang = Lang::of(parts);
        let verified = match parts.extensions.get::<PeerIdentity>() {
            Some(peer) => peer.verified().cloned(),
            None => Err(onceonly_certs::PeerRefusal {
                kind: onceonly_certs::security::RefusalKind::NoCertificate,
                reason: "not a mutual-TLS connection".into(),
                claimed: None,
            }),
        };
        match verified {
            Ok(who) => {
                let csrf = hex::encode(ring::hmac::sign(
                    &console.csrf_key,
                    who.spiffe_id().as_bytes(),
                ));
                Ok(Viewer { who, lang, csrf })
            }
            Err(refusal) => {
                tracing::warn!(reason = %refusal.reason, claimed = ?refusal.claimed, "console: refused a browser without a valid certificate");
                let (en, de) = match refusal.kind {
                    onceonly_certs::security::RefusalKind::NoCertificate => (
                        "Your browser presented no client certificate. The console admits people by the certificate the trust domain issued them; install yours in the browser and open the console again.",
                        "Ihr Browser hat kein Client-Zertifikat vorgelegt. Die Konsole lässt Personen nur mit dem Zertifikat ein, das ihnen die Vertrauensdomäne ausgestellt hat; installieren Sie Ihres im Browser und öffnen Sie die Konsole erneut.",
                    ),
                    _ => (
                        "Your client certificate was refused. Ask the trust domain's operator for a valid certificate.",
                        "Ihr Client-Zertifikat wurde abgelehnt. Bitten Sie den Betreiber der Vertrauensdomäne um ein gültiges Zertifikat.",
                    ),
                };
                Err(refused(
                    lang,
                    StatusCode::FORBIDDEN,
                    lang.pick(en, de),
                    Some(&refusal.reason),
                ))
            }
        }
    }
}

impl Viewer {
    /// Refuses anyone whose role is not one of `roles`, saying which roles
    /// the page is for.
    pub fn require(&self, roles: &[Role]) -> Result<(), Box<Response>> {
        if roles.contains(&self.who.role()) {
            return Ok(());
        }
        let names = roles
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let role = self.who.role();
        tracing::warn!(who = %self.who, "console: a page not for this role was refused");
        let message = match self.lang {
            Lang::En => {
                format!(
                    "This page is for the roles {names}; your certificate is for the role {role}."
                )
            }
            Lang::De => format!(
                "Diese Seite ist für die Rollen {names}; Ihr Zertifikat ist für die Rolle {role}."
            ),
        };
        Err(Box::new(refused(
            self.lang,
            StatusCode::FORBIDDEN,
            &message,
            None,
        )))
    }

    /// Refuses a change (a POST) that does not come from a console page:
    /// another origin, another site, or a form without this person's
    /// token.
    pub fn check_change(
        &self,
        console: &Console,
        headers: &HeaderMap,
        uri: &Uri,
        token: &str,
    ) -> Result<(), Box<Response>> {
        match same_origin(headers, uri).and_then(|()| self.check_token(console, token)) {
            Ok(()) => Ok(()),
            Err(why) => {
                tracing::warn!(who = %self.who, why, "console change refused as cross-site");
                Err(Box::new(refused(
                    self.lang,
                    StatusCode::FORBIDDEN,
                    self.lang.pick(
                        "This change did not come from a page of the console, so it was refused and nothing changed. Open the console and make the change there.",
                        "Diese Änderung kam nicht von einer Seite der Konsole; sie wurde abgelehnt, nichts wurde geändert. Öffnen Sie die Konsole und nehmen Sie die Änderung dort vor.",
                    ),
                    Some(why),
                )))
            }
        }
    }

    /// [`Self::require`] and [`Self::check_change`]: the checks every
    /// change passes.
    pub fn permit_change(
        &self,
        roles: &[Role],
        console: &Console,
        headers: &HeaderMap,
        uri: &Uri,
        token: &str,
    ) -> Result<(), Box<Response>> {
        self.require(roles)?;
        self.check_change(console, headers, uri, token)
    }

    fn check_token(&self, console: &Console, token: &str) -> Result<(), &'static str> {
        let tag =
            hex::decode(token).map_err(|_| "the form's CSRF token is missing or malformed")?;
        ring::hmac::verify(&console.csrf_key, self.who.spiffe_id().as_bytes(), &tag)
            .map_err(|_| "the form's CSRF token is not this person's")
    }
}

/// Whether a request's `Origin` and `Sec-Fetch-Site` say it came from the
/// console's own pages. Clients that send neither (not browsers) pass on
/// to the token.
fn same_origin(headers: &HeaderMap, uri: &Uri) -> Result<(), &'static str> {
    if let Some(site) = headers.get("sec-fetch-site")
        && site.as_bytes() != b"same-origin"
    {
        return Err("the browser says the request came from another site (Sec-Fetch-Site)");
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    // HTTP/2 carries the host in the URI (:authority), HTTP/1.1 in Host.
    let host = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .ok_or("the request names no host")?;
    if origin.as_bytes() == format!("https://{host}").as_bytes() {
        Ok(())
    } else {
        tracing::debug!(?origin, %host, "console: Origin is not the console's");
        Err("the request came from another origin (Origin)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().expect("header value"));
        }
        map
    }

    #[test]
    fn only_the_consoles_own_origin_may_change_anything() {
        let uri: Uri = "https://127.0.0.1:8443/policy/apply".parse().expect("uri");
        assert!(same_origin(&headers(&[("origin", "https://127.0.0.1:8443")]), &uri).is_ok());
        assert!(same_origin(&headers(&[("origin", "https://evil.example")]), &uri).is_err());
        assert!(same_origin(&headers(&[("origin", "http://127.0.0.1:8443")]), &uri).is_err());
        assert!(same_origin(&headers(&[("origin", "null")]), &uri).is_err());
        assert!(same_origin(&headers(&[("sec-fetch-site", "cross-site")]), &uri).is_err());
        assert!(same_origin(&headers(&[("sec-fetch-site", "same-site")]), &uri).is_err());
        // HTTP/1.1: the host comes from the Host header.
        let path_only: Uri = "/policy/apply".parse().expect("uri");
        assert!(
            same_origin(
                &headers(&[("origin", "https://c.test:1"), ("host", "c.test:1")]),
                &path_only
            )
            .is_ok()
        );
        assert!(
            same_origin(
                &headers(&[("origin", "https://c.test:2"), ("host", "c.test:1")]),
                &path_only
            )
            .is_err()
        );
    }
}
