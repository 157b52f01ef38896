//! Printing an error and its causes for a person, each cause once.
//!
//! Many error types say their cause in their own message *and* hand it out
//! as [`std::error::Error::source`]: thiserror does so for every field named
//! `source` or marked `#[from]`, e.g. [`crate::PkiError::Io`]
//! (`"{path}: {source}"`). Printing such an error with anyhow's `{:#}`,
//! which appends every source, then says the cause twice:
//! `pki/crl.pem: No such file or directory (os error 2): No such file or
//! directory (os error 2)`. [`error_chain`] appends a cause only where its
//! text is not already in what was printed.

use std::error::Error;

/// `error` and its causes as one line, `outer: cause: root cause`, leaving
/// out every cause whose text the line already holds.
pub fn error_chain(error: &(dyn Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(current) = cause {
        let text = current.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = current.source();
    }
    line
}

/// A binary's exit for the outcome of its work: success, or the error on
/// stderr as `error: ` and [`error_chain`], and failure (exit code 1).
pub fn exit_code(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error_chain(error.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PkiError;

    #[test]
    fn a_cause_the_message_already_says_is_printed_once() {
        let error = PkiError::Io {
            path: "pki/crl.pem".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let doubled = format!("{:#}", anyhow::Error::new(error));
        assert_eq!(doubled.matches("not found").count(), 2, "{doubled}");

        let error = anyhow::Error::new(PkiError::Io {
            path: "pki/crl.pem".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
        .context("reading the CRL");
        assert_eq!(
            error_chain(error.as_ref()),
            "reading the CRL: pki/crl.pem: entity not found"
        );
    }

    #[test]
    fn a_cause_the_message_does_not_say_is_appended() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot load the key")]
        struct Outer(#[source] std::io::Error);
        let error = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(error_chain(&error), "cannot load the key: disk on fire");
    }
}
