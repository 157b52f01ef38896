//! The subject hash that tickets and evidence statements carry instead of
//! the subject's id: SHA-256 over a label, the exchange id, the scheme and
//! the value, base64url. Salted by the exchange id, so two exchanges about
//! one person carry unrelated hashes; whoever knows the id (the register,
//! the requesting authority) recomputes it. It binds, it does not hide:
//! the salt is not secret and an 11-digit IDNr is guessed in about 10^10
//! hashes, so a ticket or statement is as confidential as the request (the
//! broker keeps only their digests). Also [`parameters_hash`], which binds
//! the evidence-type parameters the same way.

use onceonly_proto::v1::SubjectIdScheme;

/// The label that starts the hashed input.
const LABEL: &[u8] = b"onceonly-subject-v1";

/// The subject hash of `scheme`/`value` within `exchange_id`:
/// `base64url(SHA-256("onceonly-subject-v1" 0x00 exchange_id 0x00 scheme 0x00 value))`
/// with `scheme` the proto enum name, e.g. `SUBJECT_ID_SCHEME_DE_IDNR`.
pub fn subject_hash(exchange_id: &str, scheme: SubjectIdScheme, value: &str) -> String {
    let mut input = Vec::with_capacity(LABEL.len() + exchange_id.len() + value.len() + 40);
    for part in [
        LABEL,
        exchange_id.as_bytes(),
        scheme.as_str_name().as_bytes(),
        value.as_bytes(),
    ] {
        if !input.is_empty() {
            input.push(0);
        }
        input.extend_from_slice(part);
    }
    crate::digest_b64(&input)
}

/// The hash of evidence-type parameters that tickets and statements carry
/// (`prm`): base64url(SHA-256 of `key 0x00 value 0x00` for each parameter,
/// keys in byte order); "" where there are none.
pub fn parameters_hash(parameters: &std::collections::HashMap<String, String>) -> String {
    if parameters.is_empty() {
        return String::new();
    }
    let sorted: std::collections::BTreeMap<&String, &String> = parameters.iter().collect();
    let mut input = Vec::new();
    for (key, value) in sorted {
        input.extend_from_slice(key.as_bytes());
        input.push(0);
        input.extend_from_slice(value.as_bytes());
        input.push(0);
    }
    crate::digest_b64(&input)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parameters_hash_is_order_free_and_binds_every_value() {
        use std::collections::HashMap;
        assert_eq!(parameters_hash(&HashMap::new()), "");
        let a = HashMap::from([
            ("plate".to_owned(), "B-OO 1".to_owned()),
            ("x".to_owned(), "1".to_owned()),
        ]);
        let b = HashMap::from([
            ("x".to_owned(), "1".to_owned()),
            ("plate".to_owned(), "B-OO 1".to_owned()),
        ]);
        assert_eq!(parameters_hash(&a), parameters_hash(&b));
        let c = HashMap::from([
            ("plate".to_owned(), "B-OO 2".to_owned()),
            ("x".to_owned(), "1".to_owned()),
        ]);
        assert_ne!(parameters_hash(&a), parameters_hash(&c));
    }

    #[test]
    fn the_hash_depends_on_every_part() {
        let base = subject_hash("ex-1", SubjectIdScheme::DeIdnr, "86095742719");
        assert_eq!(base.len(), 43);
        assert_ne!(
            base,
            subject_hash("ex-2", SubjectIdScheme::DeIdnr, "86095742719")
        );
        assert_ne!(
            base,
            subject_hash("ex-1", SubjectIdScheme::Eidas, "86095742719")
        );
        assert_ne!(
            base,
            subject_hash("ex-1", SubjectIdScheme::DeIdnr, "86095742710")
        );
        // The separators keep parts from sliding into each other.
        assert_ne!(
            subject_hash("ex-1\0x", SubjectIdScheme::DeIdnr, "1"),
            subject_hash("ex-1", SubjectIdScheme::DeIdnr, "x\u{0}1")
        );
    }
}
