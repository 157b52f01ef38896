//! HTTP JSON sources: one call per lookup to a register's internal API.
//! The path's placeholders are percent-encoded as one path segment each,
//! query values URL-encoded, a POST body rendered with JSON-encoded
//! values; TLS with the source's CA (and client certificate), or a bearer
//! token from a file; a timeout per call.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use serde::Deserialize;

use crate::lookup::{LookupError, Values};
use crate::template::Format;

/// An HTTP source's call for one lookup.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRequestSpec {
    /// `GET` (default) or `POST`.
    #[serde(default = "default_method")]
    pub method: String,
    /// The path after `base_url`, with `{subject}` and `{<parameter>}`
    /// placeholders (each value percent-encoded as one path segment).
    pub path: String,
    /// Query parameters; values may hold placeholders (URL-encoded).
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// POST only: a JSON body template (`{{ subject }}` etc., JSON-encoded).
    #[serde(default)]
    pub body: Option<String>,
    /// Answers with these statuses mean "no such subject" (default 404).
    #[serde(default = "default_not_found")]
    pub not_found_status: Vec<u16>,
}

fn default_method() -> String {
    "GET".to_owned()
}

fn default_not_found() -> Vec<u16> {
    vec![404]
}
/// Checks the base URL: http(s), and TLS unless the API is on this host.
pub fn check_base_url(base_url: &str, has_ca: bool) -> Result<(), (String, &'static str)> {
    let url = reqwest::Url::parse(base_url).map_err(|e| {
        (
            format!("base_url {base_url:?} is not a URL ({e})"),
            "write https://host:port",
        )
    })?;
    let local = url.host_str().is_some_and(|h| {
        h == "localhost"
            || h.trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    match url.scheme() {
        "https" => Ok(()),
        "http" if local && !has_ca => Ok(()),
        "http" => Err((
            "plain http to another host: the register's data would cross the network in the clear"
                .into(),
            "use https:// with ca = the API's CA file",
        )),
        other => Err((format!("scheme {other:?}"), "use https://")),
    }
}

/// Checks a request's placeholders against the declared names.
pub fn check_request(
    request: &HttpRequestSpec,
    parameters: &BTreeSet<String>,
) -> Result<(), String> {
    if !matches!(request.method.as_str(), "GET" | "POST") {
        return Err(format!("method {:?}: GET or POST", request.method));
    }
    if request.body.is_some() && request.method != "POST" {
        return Err("a body goes with method = \"POST\"".into());
    }
    if !request.path.starts_with('/') {
        return Err(format!("path {:?} must start with /", request.path));
    }
    for text in std::iter::once(&request.path).chain(request.query.values()) {
        for name in placeholders(text)? {
            if name != "subject" && !parameters.contains(&name) {
                return Err(format!(
                    "{{{name}}} is neither {{subject}} nor a declared parameter"
                ));
            }
        }
    }
    if let Some(body) = &request.body {
        crate::template::check(body, Format::Json)?;
    }
    Ok(())
}

/// The `{name}` placeholders of `text`.
fn placeholders(text: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("an unclosed {{ in {text:?}"))?;
        names.push(after[..close].to_owned());
        rest = &after[close + 1..];
    }
    Ok(names)
}

/// `text` with each `{name}` replaced by `encode(value)`; a parameter the
/// request did not carry is empty.
fn fill(text: &str, values: &Values, encode: impl Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            return out;
        };
        out.push_str(&encode(&values.get(&after[..close]).unwrap_or_default()));
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// Percent-encodes all but RFC 3986's unreserved characters, so a value is
/// one path segment whatever it holds (`/`, `..`, `?`, `#`, `%`).
fn path_segment(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    // "." and ".." would still move up a level.
    match out.as_str() {
        "." => "%2E".into(),
        ".." => "%2E%2E".into(),
        _ => out,
    }
}

/// An HTTP JSON API.
#[derive(Debug)]
pub struct Http {
    client: reqwest::Client,
    base_url: String,
    bearer: Option<String>,
}

impl Http {
    /// Builds the client: TLS 1.2+ with the CA file only (no system
    /// roots), the client identity, the token, the timeout.
    pub fn open(
        base_url: &str,
        ca: Option<&Path>,
        client_cert: Option<(&Path, &Path)>,
        bearer_token_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<Arc<Http>, String> {
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .tls_built_in_root_certs(false)
            .user_agent("onceonly-connector");
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("{}: {e}", ca.display()))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let Some((cert, key)) = client_cert {
            let mut pem = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
            pem.extend(std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?);
            builder = builder.identity(
                reqwest::Identity::from_pem(&pem)
                    .map_err(|e| format!("{} / {}: {e}", cert.display(), key.display()))?,
            );
        }
        let bearer = bearer_token_file
            .map(|file| {
                std::fs::read_to_string(file)
                    .map(|t| t.trim().to_owned())
                    .map_err(|e| format!("{}: {e}", file.display()))
            })
            .transpose()?;
        Ok(Arc::new(Http {
            client: builder.build().map_err(|e| e.to_string())?,
            base_url: base_url.trim_end_matches('/').to_owned(),
            bearer,
        }))
    }

    /// Makes the call for one lookup (POSTing `body`, the rendered body
    /// template, where the request has one) and returns the matches: the
    /// array `results` points at, or the answer as the one match.
    pub async fn rows(
        &self,
        request: &HttpRequestSpec,
        results: Option<&str>,
        values: &Values,
        body: Option<Vec<u8>>,
    ) -> Result<Vec<Map<String, Value>>, LookupError> {
        let url = format!(
            "{}{}",
            self.base_url,
            fill(&request.path, values, path_segment)
        );
        let query: Vec<(String, String)> = request
            .query
            .iter()
            .map(|(k, v)| (k.clone(), fill(v, values, str::to_owned)))
            .collect();
        let mut call = if request.method == "POST" {
            // The request's body template, rendered by the caller.
            let body = body.unwrap_or_else(|| b"{}".to_vec());
            self.client
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body)
        } else {
            self.client.get(&url)
        };
        call = call
            .query(&query)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(token) = &self.bearer {
            call = call.bearer_auth(token);
        }
        let answer = call.send().await.map_err(|e| {
            if e.is_timeout() {
                LookupError::TooSlow
            } else {
                LookupError::Unavailable(format!("{e}"))
            }
        })?;
        let status = answer.status();
        if request.not_found_status.contains(&status.as_u16()) {
            return Err(LookupError::NotFound);
        }
        if !status.is_success() {
            return Err(LookupError::Unavailable(format!(
                "the API answered {status}"
            )));
        }
        let body: Value = answer.json().await.map_err(|e| {
            if e.is_timeout() {
                LookupError::TooSlow
            } else {
                LookupError::Unavailable(format!("the API's answer is not JSON: {e}"))
            }
        })?;
        let matches = match results {
            Some(pointer) => body.pointer(pointer).cloned().ok_or_else(|| {
                LookupError::Internal(format!("the API's answer has nothing at {pointer}"))
            })?,
            None => body,
        };
        let rows = match matches {
            Value::Array(items) => items,
            Value::Null => Vec::new(),
            one => vec![one],
        };
        rows.into_iter()
            .take(2)
            .map(|row| match row {
                Value::Object(map) => Ok(map),
                other => Err(LookupError::Internal(format!(
                    "a match is not a JSON object: {other}"
                ))),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_one_path_segment_whatever_it_holds() {
        let values = Values::new("../admin/x?y#z%2F", []);
        assert_eq!(
            fill("/persons/{subject}", &values, path_segment),
            "/persons/..%2Fadmin%2Fx%3Fy%23z%252F"
        );
        assert_eq!(path_segment(".."), "%2E%2E");
        assert_eq!(path_segment("Müller"), "M%C3%BCller");
    }

    #[test]
    fn cleartext_to_another_host_is_refused() {
        assert!(check_base_url("http://register.internal", false).is_err());
        assert!(check_base_url("http://127.0.0.1:8080", false).is_ok());
        assert!(check_base_url("https://register.internal", true).is_ok());
        assert!(check_base_url("ftp://register.internal", true).is_err());
    }
}
