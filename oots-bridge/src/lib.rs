//! The OOTS bridge: EU evidence requests (EDM QueryRequests, ebRS/RegRep 4
//! XML, carried between eDelivery AS4 access points) answered through the
//! broker, in the role of Germany's intermediary platform.
//!
//! - [`edm`]: the EDM documents: a request read by namespace and slot
//!   name, with hostile XML refused; the answers; the error codes;
//! - [`mapping`]: which EU request is which onceonly request;
//! - [`transport`]: the access point's backend interface (the Domibus WS
//!   plugin), behind a trait;
//! - [`bridge`]: one request in, one answer out, each request `@id`
//!   answered once;
//! - [`broker`]: the broker as the evidence source, the bridge in the role
//!   of an authority.
//!
//! - [`evidence`]: the evidence once fetched and checked;
//! - [`preview`]: the citizen's preview of the evidence before it is sent,
//!   and the person's sign-in behind a trait; [`pages`]: its web pages;
//! - [`config`]: `bridge.toml`; the `onceonly-oots-bridge` binary serves it.

pub mod bridge;
pub mod broker;
pub mod config;
pub mod edm;
pub mod evidence;
pub mod mapping;
pub mod pages;
pub mod preview;
pub mod transport;
