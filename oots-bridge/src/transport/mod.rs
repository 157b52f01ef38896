//! How EDM documents reach the bridge and leave it: an access point's
//! backend interface. [`Transport`] is the seam: the Domibus WS plugin
//! ([`domibus`]) is one implementation; another plugin, or an endpoint the
//! access point pushes to, is one more.

pub mod domibus;

use std::future::Future;

/// An AS4 user message as the backend sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// The access point's message id.
    pub message_id: String,
    /// `ConversationId`: the user's session.
    pub conversation_id: String,
    /// The ebMS action (`ExecuteQueryRequest`, `ExecuteQueryResponse`,
    /// `ExceptionResponse`).
    pub action: String,
    /// The message properties (`originalSender`, `finalRecipient`,
    /// `ExchangeId`, ...), by name.
    pub properties: Vec<(String, String)>,
    /// The payload parts: (Content-ID without `cid:`, MIME type, bytes).
    /// The first is the EDM document.
    pub payloads: Vec<Payload>,
}

/// One payload part.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Payload {
    /// Its Content-ID, without `cid:`.
    pub content_id: String,
    /// Its MIME type.
    pub mime_type: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

impl Message {
    /// The property `name`, where the message has it.
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why the access point could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// It could not be reached, or answered with an HTTP error.
    #[error("the access point at {endpoint} cannot be reached: {reason}")]
    Unreachable {
        /// Where.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// It answered with a SOAP fault.
    #[error("the access point refused {operation}: {reason}")]
    Fault {
        /// Which operation.
        operation: &'static str,
        /// The fault's reason.
        reason: String,
    },
    /// Its answer is not what the interface defines.
    #[error("the access point's answer to {operation} is malformed: {reason}")]
    Malformed {
        /// Which operation.
        operation: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// An access point's backend interface.
pub trait Transport: Send + Sync {
    /// The ids of messages waiting for the bridge.
    fn pending(&self) -> impl Future<Output = Result<Vec<String>, TransportError>> + Send;
    /// One waiting message, whole.
    fn retrieve(
        &self,
        message_id: &str,
    ) -> impl Future<Output = Result<Message, TransportError>> + Send;
    /// Sends `message` (its `message_id` is left empty); returns the id
    /// the access point gave it.
    fn submit(
        &self,
        message: &Message,
    ) -> impl Future<Output = Result<String, TransportError>> + Send;
}
