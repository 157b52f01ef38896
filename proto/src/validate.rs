//! The well-formedness rules the `.proto` comments promise, in one place:
//! subject identifiers by scheme (German IDNr with its ISO/IEC 7064 MOD 11,10
//! check digit, commercial register numbers, eIDAS identifiers), ids, and
//! required text fields with their size limits.
//!
//! The broker checks every request with these before anything else; the
//! connector SDK checks again so a malformed id never reaches a register's
//! code. Checks collect every violation ([`Violations`]) so one answer names
//! every wrong field.

use std::collections::HashMap;

use crate::v1::{EvidenceTypeInfo, SubjectId, SubjectIdScheme};

/// Whether media type `found` is one of `listed` (the catalogue's for an
/// evidence type): type and subtype compared without regard to case,
/// parameters (`; charset=...`) ignored. An empty list does not restrict.
/// The broker refuses evidence outside the list, and the connector SDK
/// refuses to sign it.
pub fn media_type_listed(listed: &[String], found: &str) -> bool {
    let essence = |m: &str| {
        m.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    };
    listed.is_empty()
        || (!essence(found).is_empty() && listed.iter().any(|l| essence(l) == essence(found)))
}

/// The longest purpose, legal basis or other free-text field we accept.
pub const MAX_TEXT_LEN: usize = 256;
/// The longest request id.
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// The most evidence parameters a request may carry.
pub const MAX_PARAMETERS: usize = 16;

/// One field that is missing or malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {description}")]
pub struct FieldViolation {
    /// The field's path in the request, e.g. `subject.value`.
    pub field: String,
    /// What is wrong and how to write it instead.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        FieldViolation {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// Collects violations across a request's fields.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    /// No violations yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `result`'s violation, if any.
    pub fn check(&mut self, result: Result<(), FieldViolation>) -> &mut Self {
        if let Err(violation) = result {
            self.0.push(violation);
        }
        self
    }

    /// Records a violation.
    pub fn push(&mut self, violation: FieldViolation) -> &mut Self {
        self.0.push(violation);
        self
    }

    /// `Ok` where nothing was recorded, else every violation.
    pub fn into_result(self) -> Result<(), Vec<FieldViolation>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

/// Computes the ISO/IEC 7064 MOD 11,10 check digit over `digits` (each 0-9).
pub fn mod_11_10_check_digit(digits: &[u8]) -> u8 {
    let mut product: u8 = 10;
    for &digit in digits {
        let mut sum = (digit + product) % 10;
        if sum == 0 {
            sum = 10;
        }
        product = (sum * 2) % 11;
    }
    let check = 11 - product;
    if check == 10 { 0 } else { check }
}

/// Checks a German IDNr: 11 digits, first not 0, valid check digit.
pub fn idnr(value: &str) -> Result<(), String> {
    let bytes = value.as_bytes();
    if bytes.len() != 11 || !bytes.iter().all(u8::is_ascii_digit) {
        return Err(format!(
            "an IDNr is exactly 11 digits without spaces; got {} characters",
            value.chars().count()
        ));
    }
    if bytes[0] == b'0' {
        return Err("an IDNr never starts with 0".into());
    }
    let digits: Vec<u8> = bytes.iter().map(|b| b - b'0').collect();
    let expected = mod_11_10_check_digit(&digits[..10]);
    if digits[10] != expected {
        return Err(format!(
            "check digit is {}, but the first ten digits give {expected} (ISO/IEC 7064 MOD 11,10): probably a typing error",
            digits[10]
        ));
    }
    Ok(())
}

/// Checks a German commercial register number:
/// `<court>:<HRA|HRB> <number>[ <suffix>]`, court a letter and four digits
/// (the XJustiz court code), number 1 to 6 digits without a leading zero,
/// suffix 1 or 2 capital letters. Example: `D2601:HRB 12345`.
pub fn commercial_register_number(value: &str) -> Result<(), String> {
    let hint = "write it as <court code>:<HRA|HRB> <number>, e.g. \"D2601:HRB 12345\"";
    let (court, rest) = value
        .split_once(':')
        .ok_or_else(|| format!("missing ':' after the court code; {hint}"))?;
    let court_ok = court.len() == 5
        && court.as_bytes()[0].is_ascii_uppercase()
        && court.as_bytes()[1..].iter().all(u8::is_ascii_digit);
    if !court_ok {
        return Err(format!(
            "court code {court:?} is not a capital letter and four digits; {hint}"
        ));
    }
    let (section, rest) = rest
        .split_once(' ')
        .ok_or_else(|| format!("missing space after the register section; {hint}"))?;
    if section != "HRA" && section != "HRB" {
        return Err(format!(
            "register section {section:?} is not HRA or HRB; {hint}"
        ));
    }
    let (number, suffix) = match rest.split_once(' ') {
        Some((number, suffix)) => (number, Some(suffix)),
        None => (rest, None),
    };
    let number_ok = !number.is_empty()
        && number.len() <= 6
        && !number.starts_with('0')
        && number.bytes().all(|b| b.is_ascii_digit());
    if !number_ok {
        return Err(format!(
            "register number {number:?} is not 1 to 6 digits without a leading zero; {hint}"
        ));
    }
    if let Some(suffix) = suffix
        && (suffix.is_empty()
            || suffix.len() > 2
            || !suffix.bytes().all(|b| b.is_ascii_uppercase()))
    {
        return Err(format!(
            "suffix {suffix:?} is not 1 or 2 capital letters; {hint}"
        ));
    }
    Ok(())
}

/// Checks an eIDAS unique identifier: `XX/YY/<id>`, two two-letter country
/// codes and 1 to 256 visible ASCII characters.
pub fn eidas_identifier(value: &str) -> Result<(), String> {
    let hint =
        "write it as <issuing country>/<receiving country>/<identifier>, e.g. \"DE/AT/0123456789\"";
    let mut parts = value.splitn(3, '/');
    let (Some(from), Some(to), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("not three '/'-separated parts; {hint}"));
    };
    let country = |c: &str| c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase());
    if !country(from) || !country(to) {
        return Err(format!("country codes must be two capital letters; {hint}"));
    }
    if id.is_empty() || id.len() > 256 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "identifier must be 1 to 256 visible ASCII characters; {hint}"
        ));
    }
    Ok(())
}

/// Checks a subject identifier; `field` is its path, e.g. `subject`.
pub fn subject(subject: Option<&SubjectId>, field: &str) -> Result<(), FieldViolation> {
    let Some(subject) = subject else {
        return Err(FieldViolation::new(
            field,
            "required: the subject's typed identifier (scheme and value)",
        ));
    };
    let value_field = format!("{field}.value");
    let result = match SubjectIdScheme::try_from(subject.scheme) {
        Ok(SubjectIdScheme::DeIdnr) => idnr(&subject.value),
        Ok(SubjectIdScheme::DeCommercialRegister) => commercial_register_number(&subject.value),
        Ok(SubjectIdScheme::Eidas) => eidas_identifier(&subject.value),
        Ok(SubjectIdScheme::Unspecified) => {
            return Err(FieldViolation::new(
                format!("{field}.scheme"),
                "required: one of DE_IDNR, DE_COMMERCIAL_REGISTER, EIDAS",
            ));
        }
        Err(_) => {
            return Err(FieldViolation::new(
                format!("{field}.scheme"),
                format!("unknown scheme {}", subject.scheme),
            ));
        }
    };
    result.map_err(|reason| FieldViolation::new(value_field, reason))
}

/// Checks a required free-text field (purpose, legal basis): present, at
/// most [`MAX_TEXT_LEN`] characters, no control, bidirectional formatting
/// or invisible characters (see [`optional_text`]).
pub fn required_text(field: &str, value: &str) -> Result<(), FieldViolation> {
    if value.trim().is_empty() {
        return Err(FieldViolation::new(field, "required and must not be blank"));
    }
    optional_text(field, value)
}

/// Checks an optional free-text field: at most [`MAX_TEXT_LEN`] characters,
/// no control characters (`char::is_control`: C0, DEL and C1, so also line
/// breaks and tabs) and none of [`is_bidi_control`]'s characters.
pub fn optional_text(field: &str, value: &str) -> Result<(), FieldViolation> {
    if value.chars().count() > MAX_TEXT_LEN {
        return Err(FieldViolation::new(
            field,
            format!("at most {MAX_TEXT_LEN} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldViolation::new(
            field,
            "must not contain control characters (U+0000-U+001F, U+007F-U+009F: line breaks and tabs too)",
        ));
    }
    if value.chars().any(is_bidi_control) {
        return Err(FieldViolation::new(
            field,
            "must not contain bidirectional formatting or invisible characters (U+061C, U+200B-U+200F, U+2028, U+2029, U+202A-U+202E, U+2066-U+2069, U+FEFF)",
        ));
    }
    Ok(())
}

/// Unicode's bidirectional formatting characters, which can make text read
/// differently from what it is ("Trojan Source"), and the invisible ones
/// that hide or break text where it is shown (zero-width characters, line
/// and paragraph separators, the byte order mark). [`optional_text`]'s
/// refusal lists exactly these; keep the two in step.
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{202A}'..='\u{202E}'
            | '\u{2066}'..='\u{2069}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{061C}'
            | '\u{FEFF}'
    )
}

/// `text` as it may be stored or shown: control and bidirectional
/// formatting characters dropped, at most `max_chars` characters. For text
/// that reaches the audit log before (or without) validation.
pub fn printable(text: &str, max_chars: usize) -> String {
    text.chars()
        .filter(|c| !c.is_control() && !is_bidi_control(*c))
        .take(max_chars)
        .collect()
}

/// Checks a caller's request id: 1 to 128 of `[A-Za-z0-9._:-]`.
pub fn request_id(field: &str, value: &str) -> Result<(), FieldViolation> {
    let ok = !value.is_empty()
        && value.len() <= MAX_REQUEST_ID_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(FieldViolation::new(
            field,
            "required: 1 to 128 characters of A-Z a-z 0-9 . _ : -",
        ))
    }
}

/// Checks an evidence type id's shape: 1 to 64 lower-case letters, digits
/// and '-'. (Whether it is catalogued is the caller's check.)
pub fn evidence_type_id(field: &str, value: &str) -> Result<(), FieldViolation> {
    if value.is_empty() {
        return Err(FieldViolation::new(
            field,
            "required, e.g. \"birth-certificate\"",
        ));
    }
    let ok = value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(FieldViolation::new(
            field,
            "1 to 64 lower-case letters, digits and '-', e.g. \"birth-certificate\"",
        ))
    }
}

/// Checks a request's subject scheme and parameters against the evidence
/// type it asks for: the scheme must be one the type is keyed by, every
/// parameter one the type declares, every required parameter present.
pub fn against_type(
    info: &EvidenceTypeInfo,
    subject: Option<&SubjectId>,
    parameters: &HashMap<String, String>,
    violations: &mut Violations,
) {
    if let Some(subject) = subject {
        let scheme = subject.scheme();
        if scheme != SubjectIdScheme::Unspecified
            && !info.subject_schemes.is_empty()
            && !info.subject_schemes.contains(&subject.scheme)
        {
            let expected: Vec<&str> = info
                .subject_schemes
                .iter()
                .filter_map(|s| SubjectIdScheme::try_from(*s).ok())
                .map(|s| s.as_str_name())
                .collect();
            violations.push(FieldViolation::new(
                "subject.scheme",
                format!(
                    "{} is not keyed by {}; use one of {}",
                    info.evidence_type,
                    scheme.as_str_name(),
                    expected.join(", ")
                ),
            ));
        }
    }
    for (name, value) in parameters {
        let field = format!("parameters[{name}]");
        if info.parameters.iter().any(|p| &p.name == name) {
            violations.check(optional_text(&field, value));
        } else {
            violations.push(FieldViolation::new(
                field,
                format!("{} takes no parameter {name:?}", info.evidence_type),
            ));
        }
    }
    for parameter in info.parameters.iter().filter(|p| p.required) {
        if parameters.get(&parameter.name).is_none_or(|v| v.is_empty()) {
            violations.push(FieldViolation::new(
                format!("parameters[{}]", parameter.name),
                format!("required: {}", parameter.description),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn with_check_digit(first10: &str) -> String {
        let digits: Vec<u8> = first10.bytes().map(|b| b - b'0').collect();
        format!("{first10}{}", mod_11_10_check_digit(&digits))
    }

    #[test]
    fn known_idnr_examples() {
        // Published sample IDNrs (BZSt test numbers / examples in the literature).
        assert_eq!(idnr("86095742719"), Ok(()));
        assert_eq!(idnr("65929970489"), Ok(()));
        assert!(idnr("86095742718").is_err(), "wrong check digit");
        assert!(idnr("06095742719").is_err(), "leading zero");
        assert!(idnr("8609574271").is_err(), "10 digits");
        assert!(idnr("8609574271 9").is_err(), "space");
        assert!(idnr("860957427190").is_err(), "12 digits");
    }

    #[test]
    fn commercial_register_numbers() {
        for good in [
            "D2601:HRB 12345",
            "F1103:HRA 1",
            "R3101:HRB 999999 B",
            "M1201:HRB 7 AB",
        ] {
            assert_eq!(commercial_register_number(good), Ok(()), "{good}");
        }
        for bad in [
            "D2601 HRB 12345",
            "d2601:HRB 12345",
            "D260:HRB 12345",
            "D2601:HRC 12345",
            "D2601:HRB 012345",
            "D2601:HRB 1234567",
            "D2601:HRB",
            "D2601:HRB 12 abc",
        ] {
            assert!(commercial_register_number(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn eidas_identifiers() {
        assert_eq!(eidas_identifier("DE/AT/0123456789abcdef"), Ok(()));
        assert!(eidas_identifier("DE/AT/").is_err());
        assert!(eidas_identifier("de/AT/1").is_err());
        assert!(eidas_identifier("DE/AT/a b").is_err());
        assert!(eidas_identifier("DEAT1").is_err());
    }

    #[test]
    fn subject_names_the_failing_field() {
        let bad = SubjectId {
            scheme: SubjectIdScheme::DeIdnr.into(),
            value: "123".into(),
        };
        assert_eq!(
            subject(Some(&bad), "subject").map_err(|v| v.field),
            Err("subject.value".into())
        );
        let unspecified = SubjectId {
            scheme: 0,
            value: "86095742719".into(),
        };
        assert_eq!(
            subject(Some(&unspecified), "subject").map_err(|v| v.field),
            Err("subject.scheme".into())
        );
        assert_eq!(
            subject(None, "subject").map_err(|v| v.field),
            Err("subject".into())
        );
    }

    #[test]
    fn violations_collect_every_field() {
        let mut violations = Violations::new();
        violations
            .check(required_text("purpose", ""))
            .check(required_text("legal_basis", "§ 9 BEEG"))
            .check(request_id("request_id", "bad id"));
        let fields: Vec<String> = violations
            .into_result()
            .expect_err("two violations")
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, ["purpose", "request_id"]);
    }

    /// Every character a text field must refuse: C0, DEL, C1, the bidi
    /// embeddings, overrides and isolates, the marks, the zero-width
    /// characters, the line and paragraph separators and the byte order
    /// mark.
    fn refused_characters() -> Vec<char> {
        let ranges = [
            ('\u{0000}', '\u{001F}'),
            ('\u{007F}', '\u{009F}'),
            ('\u{061C}', '\u{061C}'),
            ('\u{200B}', '\u{200F}'),
            ('\u{2028}', '\u{2029}'),
            ('\u{202A}', '\u{202E}'),
            ('\u{2066}', '\u{2069}'),
            ('\u{FEFF}', '\u{FEFF}'),
        ];
        ranges.iter().flat_map(|&(from, to)| from..=to).collect()
    }

    /// The code points a refusal's description names, as `U+XXXX` or
    /// `U+XXXX-U+YYYY`.
    fn named_code_points(description: &str) -> Vec<u32> {
        fn hex_prefix(text: &str) -> (u32, &str) {
            let len = text
                .find(|c: char| !c.is_ascii_hexdigit())
                .unwrap_or(text.len());
            let code = u32::from_str_radix(&text[..len], 16).expect("hex digits after U+");
            (code, &text[len..])
        }
        let mut named = Vec::new();
        let mut rest = description;
        while let Some(at) = rest.find("U+") {
            let (from, after) = hex_prefix(&rest[at + 2..]);
            rest = after;
            let mut to = from;
            if let Some(after_dash) = rest.strip_prefix("-U+") {
                (to, rest) = hex_prefix(after_dash);
            }
            named.extend(from..=to);
        }
        named
    }

    /// The violation `result` must be, for text holding `c`.
    fn refusal(result: Result<(), FieldViolation>, c: char) -> FieldViolation {
        match result {
            Err(violation) => violation,
            Ok(()) => panic!("U+{:04X} accepted", c as u32),
        }
    }

    #[test]
    fn text_fields_refuse_control_characters() {
        for c in [
            '\0', '\t', '\n', '\r', '\u{1B}', '\u{7F}', '\u{85}', '\u{9B}',
        ] {
            let value = format!("parental{c}allowance");
            for result in [
                required_text("purpose", &value),
                optional_text("purpose", &value),
            ] {
                let violation = refusal(result, c);
                assert_eq!(violation.field, "purpose");
                assert!(
                    violation.description.contains("control characters"),
                    "{violation}"
                );
            }
        }
    }

    #[test]
    fn text_fields_refuse_bidi_zero_width_and_separator_characters() {
        for c in [
            '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}',
            '\u{202E}', // embeddings, overrides
            '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}', // isolates
            '\u{200E}', '\u{200F}', '\u{061C}', // marks
            '\u{200B}', '\u{200C}', '\u{200D}', '\u{FEFF}', // zero-width
            '\u{2028}', '\u{2029}', // line and paragraph separators
        ] {
            let value = format!("§ 9 BEEG{c}");
            for result in [
                required_text("legal_basis", &value),
                optional_text("legal_basis", &value),
            ] {
                let violation = refusal(result, c);
                assert_eq!(violation.field, "legal_basis");
            }
        }
        // Ordinary text outside ASCII stays allowed.
        assert_eq!(
            required_text("purpose", "Elterngeld für Anna Müller, § 9 BEEG"),
            Ok(())
        );
        assert_eq!(optional_text("purpose", ""), Ok(()));
    }

    #[test]
    fn a_text_refusal_names_exactly_the_characters_it_refuses() {
        for c in refused_characters() {
            let violation = refusal(optional_text("f", &format!("a{c}b")), c);
            let named = named_code_points(&violation.description);
            assert!(
                named.contains(&(c as u32)),
                "U+{:04X} refused, but the refusal names only {:X?}: {violation}",
                c as u32,
                named
            );
            for code in named {
                let listed = char::from_u32(code).expect("a character");
                assert!(
                    optional_text("f", &format!("a{listed}b")).is_err(),
                    "the refusal names U+{code:04X}, which is accepted"
                );
            }
        }
    }

    #[test]
    fn text_fields_are_capped_in_characters() {
        let longest = "ä".repeat(MAX_TEXT_LEN);
        assert_eq!(optional_text("purpose", &longest), Ok(()));
        let violation =
            optional_text("purpose", &format!("{longest}a")).expect_err("one character too many");
        assert!(
            violation.description.contains(&MAX_TEXT_LEN.to_string()),
            "{violation}"
        );
        assert!(required_text("purpose", &format!("{longest}a")).is_err());
    }

    #[test]
    fn printable_strips_what_text_fields_refuse_and_caps_the_length() {
        let every_refused: String = refused_characters().into_iter().collect();
        assert_eq!(printable(&format!("a{every_refused}b"), 100), "ab");
        assert_eq!(
            printable("pur\u{202E}pose\n\u{1B}[2J§ 9\u{200B} BEEG\u{2028}", 100),
            "purpose[2J§ 9 BEEG"
        );
        // The cap counts characters, after stripping.
        let text = format!("{}\u{202E}{}", "ä".repeat(5), "ö".repeat(10));
        assert_eq!(printable(&text, 8), "äääääööö");
        assert_eq!(
            printable(&"x".repeat(1000), MAX_TEXT_LEN).len(),
            MAX_TEXT_LEN
        );
        assert_eq!(printable("kurz", MAX_TEXT_LEN), "kurz");
    }

    proptest! {
        #[test]
        fn printable_text_always_passes_the_text_check(chars in proptest::collection::vec(any::<char>(), 0..400)) {
            let text: String = chars.into_iter().collect();
            let shown = printable(&text, MAX_TEXT_LEN);
            prop_assert!(shown.chars().count() <= MAX_TEXT_LEN);
            prop_assert_eq!(optional_text("f", &shown), Ok(()));
        }

        #[test]
        fn every_generated_idnr_is_valid(first in 1u8..=9, rest in "[0-9]{9}") {
            let candidate = with_check_digit(&format!("{first}{rest}"));
            prop_assert_eq!(idnr(&candidate), Ok(()));
        }

        #[test]
        fn any_single_digit_change_is_caught(first in 1u8..=9, rest in "[0-9]{9}", pos in 0usize..11, delta in 1u8..=9) {
            let valid = with_check_digit(&format!("{first}{rest}"));
            let mut bytes = valid.into_bytes();
            bytes[pos] = b'0' + (bytes[pos] - b'0' + delta) % 10;
            let mutated = String::from_utf8(bytes).expect("ascii");
            // MOD 11,10 catches every single-digit error (a leading zero is caught by its own rule).
            prop_assert!(idnr(&mutated).is_err(), "{} accepted", mutated);
        }

        #[test]
        fn validators_never_panic(s in "\\PC{0,40}") {
            let _ = idnr(&s);
            let _ = commercial_register_number(&s);
            let _ = eidas_identifier(&s);
            let _ = required_text("f", &s);
        }
    }
}

#[cfg(test)]
mod media_type_tests {
    use super::media_type_listed;

    #[test]
    fn a_media_type_is_listed_whatever_its_case_and_parameters() {
        let xml = ["application/xml".to_string()];
        assert!(media_type_listed(&xml, "application/xml"));
        assert!(media_type_listed(&xml, "Application/XML; charset=utf-8"));
        for other in [
            "text/html",
            "application/x-msdownload",
            "",
            "application/xml+evil",
            "application/xm",
        ] {
            assert!(!media_type_listed(&xml, other), "{other}");
        }
        assert!(
            media_type_listed(&[], "text/html"),
            "an empty list does not restrict"
        );
    }
}

/// The most correlation ids a request may carry.
pub const MAX_CORRELATION_IDS: usize = 8;

/// Checks a request's correlation ids: at most [`MAX_CORRELATION_IDS`],
/// names of 1 to 64 letters, digits, '.', '_', '-' and unique, values
/// printable and at most 256 characters.
pub fn correlation_ids(
    field: &str,
    ids: &[crate::v1::CorrelationId],
) -> Result<(), FieldViolation> {
    if ids.len() > MAX_CORRELATION_IDS {
        return Err(FieldViolation::new(
            field,
            format!("at most {MAX_CORRELATION_IDS} correlation ids"),
        ));
    }
    for (n, id) in ids.iter().enumerate() {
        let name_ok = (1..=64).contains(&id.name.len())
            && id
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !name_ok {
            return Err(FieldViolation::new(
                format!("{field}[{n}].name"),
                "1 to 64 of letters, digits, '.', '_', '-'",
            ));
        }
        if id.value.is_empty()
            || id.value.chars().count() > 256
            || id
                .value
                .chars()
                .any(|c| c.is_control() || is_bidi_control(c))
        {
            return Err(FieldViolation::new(
                format!("{field}[{n}].value"),
                "1 to 256 printable characters",
            ));
        }
        if ids[..n].iter().any(|other| other.name == id.name) {
            return Err(FieldViolation::new(
                format!("{field}[{n}].name"),
                format!("{:?} is named twice", id.name),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod correlation_tests {
    use super::correlation_ids;
    use crate::v1::CorrelationId;

    fn id(name: &str, value: &str) -> CorrelationId {
        CorrelationId {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn correlation_ids_are_bounded_named_plainly_and_unique() {
        assert!(correlation_ids("c", &[id("oots.conversation_id", "conv-1")]).is_ok());
        assert!(correlation_ids("c", &[]).is_ok());
        let refused = |ids: &[CorrelationId]| correlation_ids("c", ids).expect_err("refused").field;
        assert_eq!(refused(&[id("", "x")]), "c[0].name");
        assert_eq!(refused(&[id("a b", "x")]), "c[0].name");
        assert_eq!(refused(&[id(&"n".repeat(65), "x")]), "c[0].name");
        assert_eq!(refused(&[id("a", "")]), "c[0].value");
        assert_eq!(refused(&[id("a", "line\nbreak")]), "c[0].value");
        assert_eq!(refused(&[id("a", &"v".repeat(257))]), "c[0].value");
        assert_eq!(refused(&[id("a", "1"), id("a", "2")]), "c[1].name");
        let many: Vec<_> = (0..9).map(|n| id(&format!("n{n}"), "v")).collect();
        assert_eq!(refused(&many), "c");
    }
}
