//! What the people who change the policy see before a change takes
//! effect: [`lint`] (what in a policy can never take effect or reaches
//! further than meant) and [`dry_run`] (the decisions already in the log,
//! decided again under an edited policy). In the broker's library so that
//! the `onceonly-policy` CLI and the broker's console show the same.

pub mod dry_run;
pub mod lint;
