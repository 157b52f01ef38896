//! Evidence as the bridge holds it once fetched and checked: what the
//! answer and the preview need of it.

use crate::edm::request::Agent;

/// Evidence fetched for a request.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Its bytes, checked against the register's statement.
    pub bytes: Vec<u8>,
    /// Who issued it.
    pub issuing_authority: Agent,
    /// When, `YYYY-MM-DD`.
    pub issuing_date: String,
    /// The broker's exchange that delivered it.
    pub exchange_id: String,
}
