//! Tools for the people who turn law into the broker's policy, so that a
//! change is seen before it is applied:
//!
//! - [`lint`]: what in a policy file can never take effect or is broader
//!   than meant: rules that never match, rules shadowed by earlier ones,
//!   authorities the trust domain never issued, rules granting more
//!   authorities than a threshold. Each finding names the line.
//! - [`diff`]: what an edit changes, rule by rule, in words.
//! - [`dry_run`]: the decisions already in the audit log, decided again
//!   under an edited policy: which would change (allowed to refused,
//!   refused to allowed), grouped by rule, subjects as pseudonyms only.
//!
//! Parsing and deciding are the broker's own ([`onceonly_broker::policy`]),
//! so what the tools say is what the broker would do.

pub use onceonly_broker::policy_review::{dry_run, lint};

/// What an edit changes, in words: the broker's own account, which it
/// also writes into the log entry of each policy it applies.
pub use onceonly_broker::policy_diff as diff;

use std::path::Path;

use onceonly_broker::policy::Policy;
use onceonly_broker::routing::RoutingTable;
use onceonly_certs::config_file::ConfigFileError;

/// Reads and checks the policy at `path` against the routing table at
/// `routing` (the evidence types it may name): the broker's errors, with
/// file, line and fix.
pub fn load(path: &Path, routing: &Path) -> Result<(Policy, String), ConfigFileError> {
    let routing = RoutingTable::load(routing)?;
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let policy = Policy::parse(path, &text, &routing)?;
    Ok((policy, text))
}
