//! One lookup, whatever the source: the values it may use and how it can
//! fail. Every failure becomes one documented refusal ([`LookupError::into_provide_error`]).

use std::collections::BTreeMap;

use onceonly_connector_sdk::ProvideError;

/// The values a lookup may use: `subject` and the request's parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Values(BTreeMap<String, String>);

impl Values {
    /// The subject's identifier and the request's parameters.
    pub fn new<'a>(
        subject: &str,
        parameters: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Self {
        let mut values: BTreeMap<String, String> = parameters
            .into_iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        values.insert("subject".to_owned(), subject.to_owned());
        Values(values)
    }

    /// The value named `name`, if the request carried it.
    pub fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }

    /// Every value, for a template's context.
    pub fn all(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

/// Why a lookup gave no document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// No match.
    #[error("no record matches the subject")]
    NotFound,
    /// More than one match where one is expected.
    #[error("several records match the subject")]
    Ambiguous,
    /// The source cannot be reached or failed.
    #[error("the source is unavailable: {0}")]
    Unavailable(String),
    /// The source refused a request's value (PostgreSQL: a value its
    /// query cannot convert, e.g. "abc" cast to a number).
    #[error("a value of the request does not fit the query: {0}")]
    InvalidValue(String),
    /// The source did not answer within its timeout.
    #[error("the source did not answer in time")]
    TooSlow,
    /// The mapping does not fit what the source answered (a column's type,
    /// a template that renders no valid document): the operator's to fix.
    #[error("{0}")]
    Internal(String),
}

impl LookupError {
    /// The SDK's refusal for this failure.
    pub fn into_provide_error(self) -> ProvideError {
        match self {
            LookupError::NotFound => ProvideError::SubjectNotFound,
            LookupError::Ambiguous => ProvideError::AmbiguousSubject,
            LookupError::Unavailable(reason) => ProvideError::RegisterUnavailable(reason),
            LookupError::InvalidValue(reason) => ProvideError::InvalidParameter {
                name: "parameters".into(),
                reason,
            },
            LookupError::TooSlow => {
                ProvideError::TooSlow("its source did not answer within its timeout".into())
            }
            LookupError::Internal(reason) => ProvideError::Internal(reason),
        }
    }
}
