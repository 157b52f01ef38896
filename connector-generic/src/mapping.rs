//! The mapping file: where each evidence type's data comes from and how it
//! becomes the evidence document. Written by the register's staff, not by
//! programmers, so every error names the file, the line and the fix.
//!
//! ```toml
//! register_name = "Schulregister Berlin"
//!
//! [sources.schools]
//! kind = "sqlite"                 # sqlite | postgres | http
//! path = "schools.db"             # relative to this file
//!
//! [[evidence_types]]
//! id = "school-leaving-certificate"
//! display_name = "School-leaving certificate"
//! subject_schemes = ["DE_IDNR"]
//! media_type = "application/json"
//! source = "schools"
//! parameters = [{ name = "year", description = "year of the certificate" }]
//! query = "SELECT name, school, year, grade FROM certificates WHERE idnr = :subject AND (:year IS NULL OR year = :year)"
//! template = '{"name": {{ name }}, "school": {{ school }}, "year": {{ year }}, "grade": {{ grade }}}'
//! ```
//!
//! Values reach a source only as bound parameters (SQL) or encoded values
//! (HTTP), never as text spliced into a query; the template escapes what
//! it inserts for the document's format.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use onceonly_certs::config_file::{line_and_column, relative_to};
use onceonly_proto::v1::{EvidenceParameter, EvidenceTypeInfo, SubjectIdScheme};
use serde::Deserialize;
use toml::Spanned;

pub use crate::http::HttpRequestSpec;
pub use crate::template::Format;

/// A mapping file that cannot be used: where, what, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}:{line}: {problem}; {fix}")]
pub struct MappingError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub problem: String,
    /// What to do.
    pub fix: String,
}

/// The whole file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingFile {
    /// The register's name, as `DescribeConnector` shows it.
    #[serde(default)]
    pub register_name: String,
    /// Named data sources.
    #[serde(default)]
    pub sources: BTreeMap<String, Spanned<SourceSpec>>,
    /// The evidence types served.
    #[serde(default)]
    pub evidence_types: Vec<Spanned<EvidenceTypeSpec>>,
}

/// Where data comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceSpec {
    /// A SQLite database file, opened read-only.
    Sqlite {
        /// The database file (relative to the mapping file).
        path: PathBuf,
        /// Connections kept open (default 8).
        #[serde(default = "default_pool_size")]
        pool_size: usize,
        /// The longest one query may run (default 2 s).
        #[serde(default = "default_timeout", with = "humantime_serde")]
        timeout: Duration,
    },
    /// A PostgreSQL database, read through a read-only session.
    Postgres {
        /// `postgres://user@host:port/database` (no password here).
        url: String,
        /// A file holding the password, if the role has one.
        #[serde(default)]
        password_file: Option<PathBuf>,
        /// The CA of the server's certificate: TLS, verified (required
        /// unless the server is on this host).
        #[serde(default)]
        ca: Option<PathBuf>,
        /// Connections kept open (default 8).
        #[serde(default = "default_pool_size")]
        pool_size: usize,
        /// The longest one query may run, enforced by the server (default
        /// 2 s).
        #[serde(default = "default_timeout", with = "humantime_serde")]
        timeout: Duration,
    },
    /// An HTTP API that answers JSON.
    Http {
        /// `https://host:port` (a path prefix may follow).
        base_url: String,
        /// The CA of the API's certificate (else the API must be plain
        /// HTTP on this host).
        #[serde(default)]
        ca: Option<PathBuf>,
        /// A client certificate (PEM) for mutual TLS, with `client_key`.
        #[serde(default)]
        client_cert: Option<PathBuf>,
        /// Its key (PEM).
        #[serde(default)]
        client_key: Option<PathBuf>,
        /// A file holding a bearer token sent as `Authorization`.
        #[serde(default)]
        bearer_token_file: Option<PathBuf>,
        /// The longest one call may take (default 2 s).
        #[serde(default = "default_timeout", with = "humantime_serde")]
        timeout: Duration,
    },
}

fn default_pool_size() -> usize {
    8
}

fn default_timeout() -> Duration {
    Duration::from_secs(2)
}

/// One evidence type, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceTypeSpec {
    /// Its id, e.g. `school-leaving-certificate`.
    pub id: Spanned<String>,
    /// A human-readable name.
    pub display_name: String,
    /// What it proves.
    #[serde(default)]
    pub description: String,
    /// The subject identifier schemes it is keyed by, e.g. `["DE_IDNR"]`.
    pub subject_schemes: Spanned<Vec<String>>,
    /// The document's media type, e.g. `application/json`.
    pub media_type: Spanned<String>,
    /// The parameters a request may carry.
    #[serde(default)]
    pub parameters: Vec<ParameterSpec>,
    /// The source's name (a key of `[sources]`).
    pub source: Spanned<String>,
    /// SQL sources: the query, with `:subject` and `:<parameter>`
    /// placeholders.
    #[serde(default)]
    pub query: Option<Spanned<String>>,
    /// HTTP sources: the call.
    #[serde(default)]
    pub request: Option<Spanned<HttpRequestSpec>>,
    /// HTTP sources: a JSON pointer to the array of matches in the answer
    /// (absent: the answer is the one match).
    #[serde(default)]
    pub results: Option<String>,
    /// Template names for values picked from each match: a column name
    /// (SQL) or a JSON pointer (HTTP). Absent: every column, or every
    /// top-level key, under its own name.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// The document: a template whose `{{ name }}` are the fields,
    /// `subject` and the parameters, escaped for the media type.
    pub template: Spanned<String>,
}

/// A parameter a request may carry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParameterSpec {
    /// Its name, e.g. `year`.
    pub name: String,
    /// What it means.
    #[serde(default)]
    pub description: String,
    /// Whether every request must carry it.
    #[serde(default)]
    pub required: bool,
}

/// A validated mapping: everything resolved, ready to open its sources.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// The file it came from.
    pub path: PathBuf,
    /// The register's name.
    pub register_name: String,
    /// Sources by name, paths resolved.
    pub sources: BTreeMap<String, SourceSpec>,
    /// Evidence types by id.
    pub evidence_types: BTreeMap<String, EvidenceTypeMapping>,
}

/// One validated evidence type.
#[derive(Debug, Clone)]
pub struct EvidenceTypeMapping {
    /// What `DescribeConnector` says of it.
    pub info: EvidenceTypeInfo,
    /// The source's name.
    pub source: String,
    /// The lookup.
    pub lookup: Lookup,
    /// Template names to columns or JSON pointers.
    pub fields: BTreeMap<String, String>,
    /// HTTP: where in the answer the matches are.
    pub results: Option<String>,
    /// The template's text.
    pub template: String,
    /// The document's format.
    pub format: Format,
    /// The document's media type.
    pub media_type: String,
    /// The line of the evidence type in the file (for errors at run time).
    pub line: usize,
}

/// How one lookup asks its source.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// A SQL query: its text with positional placeholders, and which value
    /// goes to each (`subject` or a parameter's name).
    Sql(crate::sql::BoundQuery),
    /// An HTTP call.
    Http(HttpRequestSpec),
}

impl Mapping {
    /// Reads and validates the mapping file at `path`.
    pub fn load(path: &Path) -> Result<Mapping, MappingError> {
        let text = std::fs::read_to_string(path).map_err(|e| MappingError {
            path: path.to_owned(),
            line: 1,
            problem: format!("cannot read the mapping file: {e}"),
            fix: "check the path given as `mapping` in the connector's configuration".into(),
        })?;
        Self::parse(path, &text)
    }

    /// Validates mapping `text`, read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Mapping, MappingError> {
        let at = |offset: usize, problem: String, fix: &str| MappingError {
            path: path.to_owned(),
            line: line_and_column(text, offset).0,
            problem,
            fix: fix.to_owned(),
        };
        let file: MappingFile = toml::from_str(text).map_err(|e| {
            at(
                e.span().map_or(0, |s| s.start),
                e.message().trim().to_owned(),
                "see the mapping file reference in OPERATIONS.md",
            )
        })?;
        let mut sources = BTreeMap::new();
        for (name, spec) in &file.sources {
            let start = spec.span().start;
            let resolved = resolve_source(path, spec.get_ref().clone())
                .map_err(|(problem, fix)| at(start, format!("source {name:?}: {problem}"), fix))?;
            sources.insert(name.clone(), resolved);
        }
        if file.evidence_types.is_empty() {
            return Err(at(
                0,
                "no evidence type is mapped".into(),
                "add an [[evidence_types]] table",
            ));
        }
        let mut evidence_types = BTreeMap::new();
        for spanned in &file.evidence_types {
            let spec = spanned.get_ref();
            let id = spec.id.get_ref();
            if onceonly_proto::validate::evidence_type_id("id", id).is_err() {
                return Err(at(
                    spec.id.span().start,
                    format!("{id:?} is not an evidence type id"),
                    "use lower-case letters, digits and '-', e.g. \"school-leaving-certificate\"",
                ));
            }
            if evidence_types.contains_key(id) {
                return Err(at(
                    spec.id.span().start,
                    format!("evidence type {id:?} is mapped twice"),
                    "keep one [[evidence_types]] table per id",
                ));
            }
            let mapping = evidence_type(spec, &sources, &at)?;
            evidence_types.insert(
                id.clone(),
                EvidenceTypeMapping {
                    line: line_and_column(text, spanned.span().start).0,
                    ..mapping
                },
            );
        }
        Ok(Mapping {
            path: path.to_owned(),
            register_name: file.register_name,
            sources,
            evidence_types,
        })
    }

    /// What `DescribeConnector` offers: the evidence types' infos.
    pub fn infos(&self) -> Vec<EvidenceTypeInfo> {
        self.evidence_types
            .values()
            .map(|t| t.info.clone())
            .collect()
    }
}

type At<'a> = dyn Fn(usize, String, &str) -> MappingError + 'a;

fn evidence_type(
    spec: &EvidenceTypeSpec,
    sources: &BTreeMap<String, SourceSpec>,
    at: &At<'_>,
) -> Result<EvidenceTypeMapping, MappingError> {
    let id = spec.id.get_ref();
    let mut schemes = Vec::new();
    for scheme in spec.subject_schemes.get_ref() {
        let parsed = SubjectIdScheme::from_str_name(&format!("SUBJECT_ID_SCHEME_{scheme}"))
            .filter(|s| *s != SubjectIdScheme::Unspecified)
            .ok_or_else(|| {
                at(
                    spec.subject_schemes.span().start,
                    format!("{scheme:?} is not a subject identifier scheme"),
                    "use DE_IDNR, DE_COMMERCIAL_REGISTER or EIDAS",
                )
            })?;
        schemes.push(parsed as i32);
    }
    if schemes.is_empty() {
        return Err(at(
            spec.subject_schemes.span().start,
            "no subject scheme".into(),
            "name the identifier the register is keyed by, e.g. [\"DE_IDNR\"]",
        ));
    }
    let media_type = spec.media_type.get_ref();
    let format = Format::of(media_type).ok_or_else(|| {
        at(
            spec.media_type.span().start,
            format!("{media_type:?} is not a format a template can produce"),
            "use application/json or application/xml (or a +json / +xml type)",
        )
    })?;
    let mut names = BTreeSet::new();
    for parameter in &spec.parameters {
        if parameter.name == "subject"
            || parameter.name.is_empty()
            || !parameter
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            || !names.insert(parameter.name.clone())
        {
            return Err(at(
                spec.id.span().start,
                format!(
                    "evidence type {id:?}: parameter {:?} is not a usable name (or appears twice)",
                    parameter.name
                ),
                "use lower-case letters, digits and '_', once each, and not \"subject\"",
            ));
        }
    }
    let source_name = spec.source.get_ref();
    let source = sources.get(source_name).ok_or_else(|| {
        at(
            spec.source.span().start,
            format!("no source named {source_name:?}"),
            &format!(
                "define [sources.{source_name}], or use one of: {}",
                sources.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        )
    })?;
    let lookup = match source {
        SourceSpec::Sqlite { .. } | SourceSpec::Postgres { .. } => {
            if spec.request.is_some() {
                return Err(at(
                    spec.source.span().start,
                    format!(
                        "evidence type {id:?}: `request` is for HTTP sources; {source_name:?} is SQL"
                    ),
                    "write a `query` instead",
                ));
            }
            let query = spec.query.as_ref().ok_or_else(|| {
                at(
                    spec.source.span().start,
                    format!("evidence type {id:?} has no `query` for SQL source {source_name:?}"),
                    "add query = \"SELECT ... WHERE id_column = :subject\"",
                )
            })?;
            let bound =
                crate::sql::BoundQuery::parse(query.get_ref(), &names).map_err(|problem| {
                    at(
                        query.span().start,
                        problem,
                        "use :subject and the declared parameters' names as placeholders",
                    )
                })?;
            if !bound.uses_subject() {
                return Err(at(
                    query.span().start,
                    "the query never uses :subject, so it would answer the same for everyone"
                        .into(),
                    "select by the subject: ... WHERE id_column = :subject",
                ));
            }
            Lookup::Sql(bound)
        }
        SourceSpec::Http { .. } => {
            if spec.query.is_some() {
                return Err(at(
                    spec.source.span().start,
                    format!(
                        "evidence type {id:?}: `query` is for SQL sources; {source_name:?} is HTTP"
                    ),
                    "write request = { path = \"/persons/{subject}\" } instead",
                ));
            }
            let request = spec.request.as_ref().ok_or_else(|| {
                at(
                    spec.source.span().start,
                    format!(
                        "evidence type {id:?} has no `request` for HTTP source {source_name:?}"
                    ),
                    "add request = { path = \"/persons/{subject}\" }",
                )
            })?;
            crate::http::check_request(request.get_ref(), &names).map_err(|problem| {
                at(
                    request.span().start,
                    problem,
                    "placeholders are {subject} and the declared parameters' names, e.g. /persons/{subject}",
                )
            })?;
            Lookup::Http(request.get_ref().clone())
        }
    };
    for pointer in spec.fields.values() {
        if matches!(lookup, Lookup::Http(_)) && !pointer.is_empty() && !pointer.starts_with('/') {
            return Err(at(
                spec.id.span().start,
                format!("evidence type {id:?}: field {pointer:?} is not a JSON pointer"),
                "write JSON pointers, e.g. \"/person/name\"",
            ));
        }
    }
    crate::template::check(spec.template.get_ref(), format).map_err(|problem| {
        at(
            spec.template.span().start,
            format!("evidence type {id:?}: the template does not parse: {problem}"),
            "write {{ name }} for a value; see the minijinja syntax",
        )
    })?;
    Ok(EvidenceTypeMapping {
        info: EvidenceTypeInfo {
            evidence_type: id.clone(),
            display_name: spec.display_name.clone(),
            description: spec.description.clone(),
            media_types: vec![media_type.clone()],
            subject_schemes: schemes,
            parameters: spec
                .parameters
                .iter()
                .map(|p| EvidenceParameter {
                    name: p.name.clone(),
                    description: p.description.clone(),
                    required: p.required,
                })
                .collect(),
            ..Default::default()
        },
        source: source_name.clone(),
        lookup,
        fields: spec.fields.clone(),
        results: spec.results.clone(),
        template: spec.template.get_ref().clone(),
        format,
        media_type: media_type.clone(),
        line: 0,
    })
}

/// A source with its paths made relative to the mapping file, checked.
fn resolve_source(mapping: &Path, spec: SourceSpec) -> Result<SourceSpec, (String, &'static str)> {
    let resolve = |p: Option<PathBuf>| p.map(|p| relative_to(mapping, &p));
    let exists = |p: &Option<PathBuf>, what: &str| -> Result<(), (String, &'static str)> {
        match p {
            Some(path) if !path.is_file() => Err((
                format!("{what} {} does not exist", path.display()),
                "give the path of an existing file (relative to the mapping file)",
            )),
            _ => Ok(()),
        }
    };
    let pool = |size: usize| -> Result<(), (String, &'static str)> {
        if (1..=256).contains(&size) {
            Ok(())
        } else {
            Err((format!("pool_size {size} is out of range"), "use 1 to 256"))
        }
    };
    let timeout = |t: Duration| -> Result<(), (String, &'static str)> {
        if t.is_zero() {
            Err(("timeout is zero".into(), "give e.g. \"2s\""))
        } else {
            Ok(())
        }
    };
    Ok(match spec {
        SourceSpec::Sqlite {
            path,
            pool_size,
            timeout: t,
        } => {
            let path = relative_to(mapping, &path);
            exists(&Some(path.clone()), "the database file")?;
            pool(pool_size)?;
            timeout(t)?;
            SourceSpec::Sqlite {
                path,
                pool_size,
                timeout: t,
            }
        }
        SourceSpec::Postgres {
            url,
            password_file,
            ca,
            pool_size,
            timeout: t,
        } => {
            let (password_file, ca) = (resolve(password_file), resolve(ca));
            exists(&password_file, "the password file")?;
            exists(&ca, "the CA file")?;
            crate::sql::check_postgres_url(&url, ca.is_some())?;
            pool(pool_size)?;
            timeout(t)?;
            SourceSpec::Postgres {
                url,
                password_file,
                ca,
                pool_size,
                timeout: t,
            }
        }
        SourceSpec::Http {
            base_url,
            ca,
            client_cert,
            client_key,
            bearer_token_file,
            timeout: t,
        } => {
            let (ca, client_cert, client_key, bearer_token_file) = (
                resolve(ca),
                resolve(client_cert),
                resolve(client_key),
                resolve(bearer_token_file),
            );
            exists(&ca, "the CA file")?;
            exists(&client_cert, "the client certificate")?;
            exists(&client_key, "the client key")?;
            exists(&bearer_token_file, "the bearer token file")?;
            if client_cert.is_some() != client_key.is_some() {
                return Err((
                    "client_cert and client_key go together".into(),
                    "give both, or neither",
                ));
            }
            crate::http::check_base_url(&base_url, ca.is_some())?;
            timeout(t)?;
            SourceSpec::Http {
                base_url,
                ca,
                client_cert,
                client_key,
                bearer_token_file,
                timeout: t,
            }
        }
    })
}
