//! Loading human-written TOML configuration files, shared by every onceonly
//! binary: an error names the file, the line and column, and what to do.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong (from the TOML parser, naming the key).
        message: String,
    },
    /// The file parsed, but a value is not acceptable.
    #[error("{path}: {key}: {problem}; {fix}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, e.g. `limits.concurrency`.
        key: String,
        /// What is wrong.
        problem: String,
        /// How to fix it.
        fix: String,
    },
}

impl ConfigFileError {
    /// An invalid value of `key` in `path`.
    pub fn invalid(
        path: &Path,
        key: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        ConfigFileError::Invalid {
            path: path.to_owned(),
            key: key.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

/// Parses TOML `text` as `T`; errors name `path` and the line.
pub fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigFileError> {
    toml::from_str(text).map_err(|error| {
        let (line, column) = error
            .span()
            .map(|span| line_and_column(text, span.start))
            .unwrap_or((1, 1));
        ConfigFileError::Parse {
            path: path.to_owned(),
            line,
            column,
            message: error.message().trim().to_owned(),
        }
    })
}

/// Reads and parses a TOML file.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(path, &text)
}

/// The 1-based line and column of byte `offset` in `text`.
pub fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Resolves a path written in a config file relative to the file's folder.
pub fn relative_to(config_path: &Path, written: &Path) -> PathBuf {
    if written.is_absolute() {
        written.to_owned()
    } else {
        config_path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        listen: String,
        #[serde(default)]
        limit: u32,
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let text = "listen = \"127.0.0.1:1\"\n\nlimt = 5\n";
        let error = parse_toml::<Sample>(Path::new("conf.toml"), text).expect_err("typo");
        let message = error.to_string();
        assert!(message.starts_with("conf.toml:3:1:"), "{message}");
        assert!(message.contains("limt"), "{message}");

        let error = parse_toml::<Sample>(Path::new("c.toml"), "listen = 5\n").expect_err("type");
        assert!(error.to_string().starts_with("c.toml:1:10:"), "{error}");
    }
}
