//! The `onceonly.v1` gRPC API: messages, clients and server traits generated
//! from the `.proto` files in `proto/onceonly/v1/`, which are the
//! authoritative, documented contract for every language.
//!
//! Everyone in the workspace depends on this crate for the wire types; no
//! other crate generates code from the protos.
//!
//! ```
//! use onceonly_proto::v1::{SubjectId, SubjectIdScheme};
//! let subject = SubjectId { scheme: SubjectIdScheme::DeIdnr.into(), value: "86095742719".into() };
//! assert_eq!(subject.scheme(), SubjectIdScheme::DeIdnr);
//! ```

pub mod deadline;
pub mod metadata;
pub mod status;
pub mod telemetry;
pub mod time;
pub mod validate;
pub mod xml;

/// Package `onceonly.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("onceonly.v1");
}

/// The encoded `FileDescriptorSet` of every onceonly.v1 file (and the
/// well-known types they import), for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/onceonly_descriptor.bin"));

/// The `google.rpc.ErrorInfo.domain` every onceonly error carries.
pub const ERROR_DOMAIN: &str = "onceonly.eu";

impl v1::ErrorReason {
    /// The value for `google.rpc.ErrorInfo.reason`: the enum name without its
    /// `ERROR_REASON_` prefix, e.g. `POLICY_DENIED`.
    pub fn reason(self) -> &'static str {
        let name = self.as_str_name();
        name.strip_prefix("ERROR_REASON_").unwrap_or(name)
    }

    /// The reason named by a `google.rpc.ErrorInfo.reason` value.
    pub fn from_reason(reason: &str) -> Option<Self> {
        Self::from_str_name(&format!("ERROR_REASON_{reason}"))
    }
}
