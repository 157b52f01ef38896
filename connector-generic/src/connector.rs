//! The connector: the SDK's [`Connector`] over a mapping file. A lookup
//! asks the evidence type's source, insists on exactly one match, picks
//! the fields and renders the template; the SDK around it checks the
//! broker's ticket before any of this runs, signs the document, encrypts
//! it where asked and keeps the deadline.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use onceonly_connector_sdk::{Connector, EvidencePayload, EvidenceRequest, ProvideError};
use onceonly_proto::v1::EvidenceTypeInfo;
use serde_json::{Map, Value};

use crate::http::Http;
use crate::lookup::{LookupError, Values};
use crate::mapping::{EvidenceTypeMapping, Lookup, Mapping, MappingError, SourceSpec};
use crate::sql::{Postgres, Sqlite};
use crate::template::{Format, Templates};

/// An opened source.
#[derive(Debug, Clone)]
pub enum Source {
    /// A SQLite file.
    Sqlite(Arc<Sqlite>),
    /// A PostgreSQL database.
    Postgres(Arc<Postgres>),
    /// An HTTP JSON API.
    Http(Arc<Http>),
}

impl Source {
    /// Opens what `spec` describes (PostgreSQL connects when first used).
    pub fn open(spec: &SourceSpec) -> Result<Source, String> {
        Ok(match spec {
            SourceSpec::Sqlite {
                path,
                pool_size,
                timeout,
            } => Source::Sqlite(Sqlite::open(path, *pool_size, *timeout)?),
            SourceSpec::Postgres {
                url,
                password_file,
                ca,
                pool_size,
                timeout,
            } => Source::Postgres(Postgres::open(
                url,
                password_file.as_deref(),
                ca.as_deref(),
                *pool_size,
                *timeout,
            )?),
            SourceSpec::Http {
                base_url,
                ca,
                client_cert,
                client_key,
                bearer_token_file,
                timeout,
            } => Source::Http(Http::open(
                base_url,
                ca.as_deref(),
                client_cert.as_deref().zip(client_key.as_deref()),
                bearer_token_file.as_deref(),
                *timeout,
            )?),
        })
    }
}

/// A mapping with its sources open.
#[derive(Debug)]
pub struct Loaded {
    /// The mapping.
    pub mapping: Mapping,
    sources: BTreeMap<String, Source>,
    /// Its documents' templates (by evidence type id) and HTTP bodies
    /// (`<id>#body`), parsed once.
    templates: Templates,
}

/// The name of an HTTP request body's template.
fn body_template(evidence_type: &str) -> String {
    format!("{evidence_type}#body")
}

/// Why a mapping could not be put into service.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file is wrong.
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// A source cannot be opened.
    #[error("{path}: source {name:?} cannot be opened: {reason}")]
    Source {
        /// The mapping file.
        path: PathBuf,
        /// The source.
        name: String,
        /// Why.
        reason: String,
    },
    /// A reload would change what the connector offers.
    #[error(
        "{path}: the evidence types or their parameters changed; a reload changes how types are served, not which: restart the connector to offer the new set (the old mapping stays in force)"
    )]
    OfferChanged {
        /// The mapping file.
        path: PathBuf,
    },
}

impl Loaded {
    /// Loads the mapping at `path` and opens its sources.
    pub fn load(path: &Path) -> Result<Loaded, LoadError> {
        let mapping = Mapping::load(path)?;
        let mut sources = BTreeMap::new();
        for (name, spec) in &mapping.sources {
            let source = Source::open(spec).map_err(|reason| LoadError::Source {
                path: path.to_owned(),
                name: name.clone(),
                reason,
            })?;
            sources.insert(name.clone(), source);
        }
        let mut templates = Vec::new();
        for (id, evidence_type) in &mapping.evidence_types {
            templates.push((
                id.clone(),
                evidence_type.template.clone(),
                evidence_type.format,
            ));
            if let Lookup::Http(request) = &evidence_type.lookup
                && let Some(body) = &request.body
            {
                templates.push((body_template(id), body.clone(), Format::Json));
            }
        }
        // Each parsed when the mapping was checked: this does not fail.
        let templates = Templates::new(templates).map_err(|reason| LoadError::Source {
            path: path.to_owned(),
            name: "templates".into(),
            reason,
        })?;
        Ok(Loaded {
            mapping,
            sources,
            templates,
        })
    }

    /// Checks every SQL query against its database (it compiles; its
    /// columns convert): what `--check` adds to the file's validation.
    pub async fn check_queries(&self) -> Result<usize, String> {
        let mut checked = 0;
        for (id, mapping) in &self.mapping.evidence_types {
            let Lookup::Sql(query) = &mapping.lookup else {
                continue;
            };
            let result = match &self.sources[&mapping.source] {
                Source::Sqlite(db) => db.prepare(query),
                Source::Postgres(db) => db.prepare(query).await,
                Source::Http(_) => Ok(()),
            };
            result.map_err(|e| {
                format!(
                    "{}:{}: evidence type {id:?}: the query does not fit source {:?}: {e}",
                    self.mapping.path.display(),
                    mapping.line,
                    mapping.source
                )
            })?;
            checked += 1;
        }
        Ok(checked)
    }

    /// One lookup of `evidence_type` for `values`: the document.
    pub async fn lookup(
        &self,
        evidence_type: &str,
        values: &Values,
        deadline: Option<Instant>,
    ) -> Result<EvidencePayload, LookupError> {
        let mapping = self
            .mapping
            .evidence_types
            .get(evidence_type)
            .ok_or_else(|| {
                LookupError::Internal(format!("evidence type {evidence_type:?} is not mapped"))
            })?;
        let rows = match (&mapping.lookup, &self.sources[&mapping.source]) {
            (Lookup::Sql(query), Source::Sqlite(db)) => {
                db.rows(query, query.values(values), deadline).await?
            }
            (Lookup::Sql(query), Source::Postgres(db)) => {
                db.rows(query, query.values(values)).await?
            }
            (Lookup::Http(request), Source::Http(api)) => {
                let body = request.body.is_some().then(|| {
                    self.templates
                        .render(&body_template(evidence_type), Map::new(), values)
                });
                api.rows(request, mapping_results(mapping), values, body.transpose()?)
                    .await?
            }
            _ => {
                return Err(LookupError::Internal(
                    "the lookup does not fit its source".into(),
                ));
            }
        };
        let row = match <[_; 1]>::try_from(rows) {
            Ok([row]) => row,
            Err(rows) if rows.is_empty() => return Err(LookupError::NotFound),
            Err(_) => return Err(LookupError::Ambiguous),
        };
        let fields = pick(mapping, row);
        let bytes = self.templates.render(evidence_type, fields, values)?;
        Ok(EvidencePayload::new(bytes, mapping.media_type.clone()))
    }
}

fn mapping_results(mapping: &EvidenceTypeMapping) -> Option<&str> {
    mapping.results.as_deref()
}

/// The template's fields from one match: as they are, or picked by column
/// name (SQL) or JSON pointer (HTTP); a field the match lacks is null.
fn pick(mapping: &EvidenceTypeMapping, row: Map<String, Value>) -> Map<String, Value> {
    if mapping.fields.is_empty() {
        return row;
    }
    let row = Value::Object(row);
    mapping
        .fields
        .iter()
        .map(|(name, from)| {
            let value = if from.starts_with('/') || from.is_empty() {
                row.pointer(from)
            } else {
                row.get(from)
            };
            (name.clone(), value.cloned().unwrap_or(Value::Null))
        })
        .collect()
}

/// The connector: the mapping in force, replaced whole on a reload.
#[derive(Debug, Clone)]
pub struct GenericConnector {
    path: PathBuf,
    loaded: Arc<RwLock<Arc<Loaded>>>,
    offer: Vec<EvidenceTypeInfo>,
}

impl GenericConnector {
    /// Loads the mapping at `path`.
    pub fn load(path: &Path) -> Result<GenericConnector, LoadError> {
        let loaded = Loaded::load(path)?;
        let offer = loaded.mapping.infos();
        Ok(GenericConnector {
            path: path.to_owned(),
            loaded: Arc::new(RwLock::new(Arc::new(loaded))),
            offer,
        })
    }

    /// The mapping in force.
    pub fn current(&self) -> Arc<Loaded> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Loads the mapping file again and puts it in force; on any error the
    /// old one stays and the error says why. Returns the number of
    /// evidence types.
    pub fn reload(&self) -> Result<usize, LoadError> {
        let loaded = Loaded::load(&self.path)?;
        if loaded.mapping.infos() != self.offer {
            return Err(LoadError::OfferChanged {
                path: self.path.clone(),
            });
        }
        let count = loaded.mapping.evidence_types.len();
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        Ok(count)
    }
}

impl Connector for GenericConnector {
    fn evidence_types(&self) -> Vec<EvidenceTypeInfo> {
        self.offer.clone()
    }

    fn register_name(&self) -> String {
        self.current().mapping.register_name.clone()
    }

    async fn provide(&self, request: EvidenceRequest) -> Result<EvidencePayload, ProvideError> {
        let loaded = self.current();
        let values = Values::new(&request.subject.value, &request.parameters);
        loaded
            .lookup(&request.evidence_type, &values, request.deadline)
            .await
            .map_err(|error| {
                if let LookupError::Internal(detail) = &error {
                    tracing::error!(
                        exchange_id = %request.exchange_id,
                        evidence_type = %request.evidence_type,
                        %detail,
                        "the mapping does not fit its source; fix the mapping file"
                    );
                }
                error.into_provide_error()
            })
    }
}
