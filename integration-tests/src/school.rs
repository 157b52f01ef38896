//! The fourth sample register: a school register that no one programmed.
//! `onceonly-connector` serves it from the shipped mapping file over an
//! SQLite database made from the shipped SQL (`connector-generic/config/`),
//! for the demo and the tests.

use std::path::{Path, PathBuf};

/// The shipped SQL that creates the sample database.
pub const SCHOOL_SQL: &str = include_str!("../../connector-generic/config/school.sql");
/// The shipped mapping file.
pub const SCHOOL_MAPPING: &str = include_str!("../../connector-generic/config/school-mapping.toml");
/// The school register's connector id.
pub const SCHOOL_REGISTER: &str = "school-register";
/// The authority the sample policy lets fetch school-leaving certificates
/// (a student finance office).
pub const BAFOEG: &str = "bafoeg-berlin";
/// Holds two certificates (2012 and 2015): ambiguous without `year`.
pub const TWO_CERTIFICATES: &str = "47782602413";
/// In the civil register, with no school-leaving certificate.
pub const NO_CERTIFICATE: &str = "10407933793";

/// Creates `school.db` from the shipped SQL and the shipped mapping beside
/// it in `dir`; returns the mapping file's path.
pub fn lay_out(dir: &Path) -> PathBuf {
    let database = rusqlite::Connection::open(dir.join("school.db")).expect("school.db");
    database.execute_batch(SCHOOL_SQL).expect("the shipped SQL");
    drop(database);
    let mapping = dir.join("school-mapping.toml");
    std::fs::write(&mapping, SCHOOL_MAPPING).expect("mapping");
    mapping
}

/// A request for a school-leaving certificate the sample policy allows the
/// student finance office.
pub fn school_leaving_certificate(
    request_id: &str,
    idnr: &str,
) -> onceonly_proto::v1::RequestEvidenceRequest {
    onceonly_proto::v1::RequestEvidenceRequest {
        request_id: request_id.into(),
        evidence_type: "school-leaving-certificate".into(),
        subject: Some(onceonly_proto::v1::SubjectId {
            scheme: onceonly_proto::v1::SubjectIdScheme::DeIdnr.into(),
            value: idnr.into(),
        }),
        purpose: "student-finance".into(),
        legal_basis: "§ 46 Abs. 3 BAföG".into(),
        ..Default::default()
    }
}
