//! `onceonly-connector`: a ready connector for registers that sit on a
//! relational database or behind an internal JSON API. Its evidence types
//! come from a mapping file ([`mapping`]): for each, a source (SQLite,
//! PostgreSQL, HTTP), a lookup (a parameterised query, or a call) and a
//! template that shapes the one matching record into the evidence
//! document. Built on the connector SDK, so every guarantee of the
//! connector contract holds: the broker's ticket is checked before any
//! lookup, the document is signed and, where asked, encrypted to the
//! requester, deadlines are kept. No match refuses (NOT_FOUND), several
//! refuse (FAILED_PRECONDITION, AMBIGUOUS_SUBJECT): it never guesses.

pub mod config;
pub mod connector;
pub mod http;
pub mod lookup;
pub mod mapping;
pub mod sql;
pub mod template;

pub use config::GenericConfig;
pub use connector::{GenericConnector, LoadError, Loaded};
pub use mapping::{Mapping, MappingError};
