//! Subject pseudonyms: HMAC-SHA-256 of the subject id under a key kept
//! apart from the data directory. The audit log stores only the pseudonym,
//! so a stolen data directory does not reveal whom records are about, while
//! an auditor who is given a subject id can still find its records.

use std::path::Path;

use onceonly_proto::v1::SubjectIdScheme;
use rand::RngCore;
use ring::hmac;

/// Domain separation for the HMAC input.
const CONTEXT: &[u8] = b"onceonly-subject-pseudonym-v1\0";

/// Turns subject ids into pseudonyms.
pub struct Pseudonymiser {
    key: hmac::Key,
}

impl std::fmt::Debug for Pseudonymiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pseudonymiser(<key>)")
    }
}

impl Pseudonymiser {
    /// Reads the key (64 hex digits) from `path`, creating it (mode 0600)
    /// where it does not exist.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        let secret = match std::fs::read_to_string(path) {
            Ok(text) => hex::decode(text.trim())
                .ok()
                .filter(|k| k.len() == 32)
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}: not a pseudonym key (64 hex digits)", path.display()),
                    )
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut secret = vec![0u8; 32];
                rand::rng().fill_bytes(&mut secret);
                onceonly_certs::pki::write_secret_file(path, hex::encode(&secret).as_bytes())
                    .map_err(std::io::Error::other)?;
                secret
            }
            Err(e) => return Err(e),
        };
        Ok(Self::from_secret(&secret))
    }

    /// A pseudonymiser with a given secret.
    pub fn from_secret(secret: &[u8]) -> Self {
        Pseudonymiser {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// The pseudonym of a subject id (also of a malformed one, so that even
    /// refused requests are findable by what they named).
    pub fn pseudonym(&self, scheme: i32, value: &str) -> Vec<u8> {
        let scheme_name = SubjectIdScheme::try_from(scheme)
            .map(|s| s.as_str_name())
            .unwrap_or("UNKNOWN");
        let mut context = hmac::Context::with_key(&self.key);
        context.update(CONTEXT);
        context.update(scheme_name.as_bytes());
        context.update(b"\0");
        context.update(value.as_bytes());
        context.sign().as_ref().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_are_keyed_and_stable() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("keys/pseudonym.key");
        let first = Pseudonymiser::load_or_create(&path).expect("created");
        let again = Pseudonymiser::load_or_create(&path).expect("read back");
        let a = first.pseudonym(1, "82281866209");
        assert_eq!(a, again.pseudonym(1, "82281866209"));
        assert_ne!(a, first.pseudonym(1, "21641045750"));
        assert_ne!(
            a,
            first.pseudonym(2, "82281866209"),
            "scheme is part of the input"
        );
        assert_ne!(
            a,
            Pseudonymiser::from_secret(&[7; 32]).pseudonym(1, "82281866209")
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }
}
