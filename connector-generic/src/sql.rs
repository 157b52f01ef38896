//! SQL sources: SQLite (read-only file, for trials and the demo) and
//! PostgreSQL (a pool of read-only sessions, TLS verified, a server-side
//! statement timeout). A query names its values `:subject` and
//! `:<parameter>`; they are rewritten to the database's positional
//! placeholders once, when the mapping is loaded, and every value is bound
//! as text, never spliced into the SQL.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::lookup::{LookupError, Values};

/// A query with its placeholders numbered: `text` has `?1`.. (SQLite) or
/// `$1`.. (PostgreSQL) where the file had names; `names[i]` is the value
/// of placeholder `i + 1` (`subject` or a parameter's name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundQuery {
    /// As written.
    pub written: String,
    /// The distinct names, in the order of first use.
    pub names: Vec<String>,
    /// The text with `:name` replaced by `\u{0}N` (the number), before the
    /// database's marker is put in.
    numbered: String,
}

impl BoundQuery {
    /// Finds the placeholders of `query`: `:name` outside string literals,
    /// quoted identifiers and comments, and not PostgreSQL's `::` cast.
    /// Names must be `subject` or one of `parameters`.
    pub fn parse(query: &str, parameters: &BTreeSet<String>) -> Result<BoundQuery, String> {
        let chars: Vec<char> = query.chars().collect();
        let mut out = String::with_capacity(query.len());
        let mut names: Vec<String> = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            match c {
                '\'' | '"' => {
                    // A literal or a quoted identifier, doubled quotes inside.
                    out.push(c);
                    i += 1;
                    loop {
                        let Some(&d) = chars.get(i) else {
                            return Err(format!("an unterminated {c} in the query"));
                        };
                        out.push(d);
                        i += 1;
                        if d == c {
                            if chars.get(i) == Some(&c) {
                                out.push(c);
                                i += 1;
                            } else {
                                break;
                            }
                        }
                    }
                }
                '-' if chars.get(i + 1) == Some(&'-') => {
                    while i < chars.len() && chars[i] != '\n' {
                        out.push(chars[i]);
                        i += 1;
                    }
                }
                '/' if chars.get(i + 1) == Some(&'*') => {
                    let end = query_find(&chars, i + 2, "*/")
                        .ok_or_else(|| "an unterminated /* comment in the query".to_owned())?;
                    out.extend(&chars[i..end + 2]);
                    i = end + 2;
                }
                ':' if chars.get(i + 1) == Some(&':') => {
                    out.push_str("::");
                    i += 2;
                }
                ':' if chars
                    .get(i + 1)
                    .is_some_and(|n| n.is_ascii_alphabetic() || *n == '_') =>
                {
                    let start = i + 1;
                    let mut end = start;
                    while end < chars.len()
                        && (chars[end].is_ascii_alphanumeric() || chars[end] == '_')
                    {
                        end += 1;
                    }
                    let name: String = chars[start..end].iter().collect();
                    if name != "subject" && !parameters.contains(&name) {
                        return Err(format!(
                            ":{name} is neither :subject nor a declared parameter"
                        ));
                    }
                    let number = match names.iter().position(|n| *n == name) {
                        Some(at) => at + 1,
                        None => {
                            names.push(name);
                            names.len()
                        }
                    };
                    out.push('\u{0}');
                    out.push_str(&number.to_string());
                    i = end;
                }
                '\u{0}' => return Err("a NUL character in the query".into()),
                _ => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        Ok(BoundQuery {
            written: query.to_owned(),
            names,
            numbered: out,
        })
    }

    /// Whether the query selects by the subject.
    pub fn uses_subject(&self) -> bool {
        self.names.iter().any(|n| n == "subject")
    }

    /// The text with `marker` before each placeholder's number (`?` for
    /// SQLite, `$` for PostgreSQL).
    pub fn text(&self, marker: char) -> String {
        self.numbered.replace('\u{0}', &marker.to_string())
    }

    /// The values to bind, in placeholder order; a parameter the request
    /// did not carry is NULL.
    pub fn values(&self, values: &Values) -> Vec<Option<String>> {
        self.names.iter().map(|name| values.get(name)).collect()
    }
}

fn query_find(chars: &[char], from: usize, needle: &str) -> Option<usize> {
    let needle: Vec<char> = needle.chars().collect();
    (from..chars.len().saturating_sub(needle.len() - 1)).find(|&i| chars[i..].starts_with(&needle))
}

/// Checks a PostgreSQL URL: parseable, no password in it, TLS unless the
/// server is on this host.
pub fn check_postgres_url(url: &str, has_ca: bool) -> Result<(), (String, &'static str)> {
    let config: tokio_postgres::Config = url.parse().map_err(|e| {
        (
            format!("url {url:?} is not a PostgreSQL URL ({e})"),
            "write postgres://user@host:5432/database",
        )
    })?;
    if config.get_password().is_some() {
        return Err((
            "the url holds a password".into(),
            "put it in a file of its own and name it as password_file",
        ));
    }
    let local = config.get_hosts().iter().all(|host| match host {
        tokio_postgres::config::Host::Tcp(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        tokio_postgres::config::Host::Unix(_) => true,
    });
    if !has_ca && !local {
        return Err((
            "a server on another host without `ca`: the register's data would cross the network in the clear".into(),
            "give ca = the file of the CA that issued the server's certificate",
        ));
    }
    Ok(())
}

/// A SQLite database file, opened read-only; a few connections kept.
pub struct Sqlite {
    path: PathBuf,
    pool: Mutex<Vec<rusqlite::Connection>>,
    pool_size: usize,
    timeout: Duration,
}

impl std::fmt::Debug for Sqlite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sqlite").field("path", &self.path).finish()
    }
}

impl Sqlite {
    /// Opens `path` read-only (one connection now, to fail early).
    pub fn open(path: &Path, pool_size: usize, timeout: Duration) -> Result<Arc<Sqlite>, String> {
        let sqlite = Sqlite {
            path: path.to_owned(),
            pool: Mutex::new(Vec::new()),
            pool_size,
            timeout,
        };
        let first = sqlite.connect()?;
        sqlite.put_back(first);
        Ok(Arc::new(sqlite))
    }

    fn connect(&self) -> Result<rusqlite::Connection, String> {
        use rusqlite::OpenFlags;
        let connection = rusqlite::Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| format!("cannot open {}: {e}", self.path.display()))?;
        // Refuse writes whatever the query says.
        connection
            .pragma_update(None, "query_only", true)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        connection
            .busy_timeout(self.timeout)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        Ok(connection)
    }

    fn take(&self) -> Result<rusqlite::Connection, String> {
        let pooled = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match pooled {
            Some(connection) => Ok(connection),
            None => self.connect(),
        }
    }

    fn put_back(&self, connection: rusqlite::Connection) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < self.pool_size {
            pool.push(connection);
        }
    }

    /// Checks that `query` compiles against the database (`--check`).
    pub fn prepare(&self, query: &BoundQuery) -> Result<(), String> {
        let connection = self.take()?;
        let prepared = connection.prepare(&query.text('?')).map(drop);
        self.put_back(connection);
        prepared.map_err(|e| e.to_string())
    }

    /// Runs `query` with `values` on a blocking thread, interrupted at
    /// the timeout or `deadline`, whichever comes first; at most 2 rows
    /// are read (one is the answer, two are one too many).
    pub async fn rows(
        self: &Arc<Self>,
        query: &BoundQuery,
        values: Vec<Option<String>>,
        deadline: Option<Instant>,
    ) -> Result<Vec<Map<String, Value>>, LookupError> {
        let sqlite = self.clone();
        let text = query.text('?');
        let stop = deadline.map_or(Instant::now() + self.timeout, |d| {
            d.min(Instant::now() + self.timeout)
        });
        tokio::task::spawn_blocking(move || {
            let connection = sqlite.take().map_err(LookupError::Unavailable)?;
            let result = run_sqlite(&connection, &text, &values, stop);
            connection.progress_handler(0, None::<fn() -> bool>);
            sqlite.put_back(connection);
            result
        })
        .await
        .map_err(|e| LookupError::Internal(format!("the SQLite task failed: {e}")))?
    }
}

fn run_sqlite(
    connection: &rusqlite::Connection,
    text: &str,
    values: &[Option<String>],
    stop: Instant,
) -> Result<Vec<Map<String, Value>>, LookupError> {
    use rusqlite::types::ValueRef;
    connection.progress_handler(1000, Some(move || Instant::now() >= stop));
    let mut statement = connection
        .prepare_cached(text)
        .map_err(|e| LookupError::Internal(format!("the query does not compile: {e}")))?;
    let columns: Vec<String> = statement
        .column_names()
        .iter()
        .map(|c| (*c).to_owned())
        .collect();
    let mut rows = statement
        .query(rusqlite::params_from_iter(values.iter()))
        .map_err(|e| sqlite_error(e, stop))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(|e| sqlite_error(e, stop))? {
        let mut map = Map::new();
        for (n, column) in columns.iter().enumerate() {
            let value = match row
                .get_ref(n)
                .map_err(|e| LookupError::Internal(e.to_string()))?
            {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(i) => Value::from(i),
                ValueRef::Real(r) => Value::from(r),
                ValueRef::Text(t) => Value::from(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Blob(_) => {
                    return Err(LookupError::Internal(format!(
                        "column {column} holds a BLOB, which no document format takes; select it as text or leave it out"
                    )));
                }
            };
            map.insert(column.clone(), value);
        }
        out.push(map);
        if out.len() > 1 {
            break;
        }
    }
    Ok(out)
}

fn sqlite_error(error: rusqlite::Error, stop: Instant) -> LookupError {
    if Instant::now() >= stop {
        LookupError::TooSlow
    } else {
        LookupError::Unavailable(error.to_string())
    }
}

/// A PostgreSQL database: a pool of sessions that are read-only, with the
/// source's timeout as the server's statement timeout.
#[derive(Debug)]
pub struct Postgres {
    pool: deadpool_postgres::Pool,
    timeout: Duration,
}

impl Postgres {
    /// Builds the pool (connections are made when first needed).
    pub fn open(
        url: &str,
        password_file: Option<&Path>,
        ca: Option<&Path>,
        pool_size: usize,
        timeout: Duration,
    ) -> Result<Arc<Postgres>, String> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
        if let Some(file) = password_file {
            let password =
                std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
            config.password(password.trim_end_matches(['\n', '\r']));
        }
        let millis = timeout.as_millis();
        config.options(format!(
            "-c default_transaction_read_only=on -c statement_timeout={millis} -c lock_timeout={millis}"
        ));
        config.application_name("onceonly-connector");
        config.connect_timeout(timeout);
        let manager_config = deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        };
        let manager = match ca {
            Some(ca) => {
                let roots = onceonly_certs::pki::load_certs(ca).map_err(|e| e.to_string())?;
                let mut store = rustls::RootCertStore::empty();
                for root in roots {
                    store
                        .add(root)
                        .map_err(|e| format!("{}: {e}", ca.display()))?;
                }
                let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| e.to_string())?
                .with_root_certificates(store)
                .with_no_client_auth();
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                deadpool_postgres::Manager::from_config(
                    config,
                    tokio_postgres_rustls::MakeRustlsConnect::new(tls),
                    manager_config,
                )
            }
            None => deadpool_postgres::Manager::from_config(
                config,
                tokio_postgres::NoTls,
                manager_config,
            ),
        };
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(Postgres { pool, timeout }))
    }

    /// Checks that `query` compiles against the database and that its
    /// columns are of types a document can hold (`--check`).
    pub async fn prepare(&self, query: &BoundQuery) -> Result<(), String> {
        let client = self.pool.get().await.map_err(|e| e.to_string())?;
        let types = vec![tokio_postgres::types::Type::TEXT; query.names.len()];
        let statement = client
            .prepare_typed_cached(&query.text('$'), &types)
            .await
            .map_err(|e| e.to_string())?;
        for column in statement.columns() {
            if pg_supported(column.type_()).is_none() {
                return Err(format!(
                    "column {} has type {}, which the connector does not convert; cast it in the query, e.g. {}::text",
                    column.name(),
                    column.type_(),
                    column.name()
                ));
            }
        }
        Ok(())
    }

    /// Runs `query` with `values`: at most 2 rows are read.
    pub async fn rows(
        &self,
        query: &BoundQuery,
        values: Vec<Option<String>>,
    ) -> Result<Vec<Map<String, Value>>, LookupError> {
        use futures::StreamExt;
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| LookupError::Unavailable(e.to_string()))?;
        let types = vec![tokio_postgres::types::Type::TEXT; query.names.len()];
        let statement = client
            .prepare_typed_cached(&query.text('$'), &types)
            .await
            .map_err(|e| pg_error(&e, self.timeout))?;
        let rows = client
            .query_raw(&statement, values.iter())
            .await
            .map_err(|e| pg_error(&e, self.timeout))?;
        let mut rows = std::pin::pin!(rows);
        let mut out = Vec::new();
        while let Some(row) = rows.next().await {
            let row = row.map_err(|e| pg_error(&e, self.timeout))?;
            let mut map = Map::new();
            for (n, column) in row.columns().iter().enumerate() {
                let value = pg_value(&row, n).map_err(LookupError::Internal)?;
                map.insert(column.name().to_owned(), value);
            }
            out.push(map);
            if out.len() > 1 {
                break;
            }
        }
        Ok(out)
    }
}

fn pg_error(error: &tokio_postgres::Error, timeout: Duration) -> LookupError {
    match error.code() {
        // statement_timeout: the register was too slow.
        Some(code) if *code == tokio_postgres::error::SqlState::QUERY_CANCELED => {
            LookupError::TooSlow
        }
        // Data exceptions: a value the query cannot convert.
        Some(code) if code.code().starts_with("22") => LookupError::InvalidValue(
            error
                .as_db_error()
                .map_or_else(|| error.to_string(), |db| db.message().to_owned()),
        ),
        Some(code) if code.code().starts_with("42") => {
            LookupError::Internal(format!("the query does not fit the database: {error}"))
        }
        _ => LookupError::Unavailable(format!("{error} (timeout {timeout:?})")),
    }
}

/// The JSON kind a PostgreSQL type converts to, where it does.
fn pg_supported(ty: &tokio_postgres::types::Type) -> Option<&'static str> {
    use tokio_postgres::types::Type;
    match *ty {
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => Some("string"),
        Type::INT2 | Type::INT4 | Type::INT8 => Some("integer"),
        Type::FLOAT4 | Type::FLOAT8 => Some("number"),
        Type::BOOL => Some("boolean"),
        _ => None,
    }
}

fn pg_value(row: &tokio_postgres::Row, n: usize) -> Result<Value, String> {
    use tokio_postgres::types::Type;
    let column = &row.columns()[n];
    let err = |e: tokio_postgres::Error| format!("column {}: {e}", column.name());
    Ok(match *column.type_() {
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => row
            .try_get::<_, Option<String>>(n)
            .map_err(err)?
            .map_or(Value::Null, Value::from),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(n)
            .map_err(err)?
            .map_or(Value::Null, Value::from),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(n)
            .map_err(err)?
            .map_or(Value::Null, Value::from),
        Type::INT8 => row
            .try_get::<_, Option<i64>>(n)
            .map_err(err)?
            .map_or(Value::Null, Value::from),
        Type::FLOAT4 => row
            .try_get::<_, Option<f32>>(n)
            .map_err(err)?
            .map_or(Value::Null, Value::from),
        Type::FLOAT8 => row
            .try_get::<_, Option<f64>>(n)
            .map_err(err)?
            .map_or(Value::Null, Value::from),
        Type::BOOL => row
            .try_get::<_, Option<bool>>(n)
            .map_err(err)?
            .map_or(Value::Null, Value::from),
        ref other => {
            return Err(format!(
                "column {} has type {other}, which the connector does not convert; cast it in the query, e.g. {}::text",
                column.name(),
                column.name()
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn placeholders_are_numbered_outside_literals_comments_and_casts() {
        let query = BoundQuery::parse(
            "SELECT ':subject', \"a:b\", x::text -- :year\n FROM t /* :subject */ WHERE id = :subject AND (:year IS NULL OR y = :year::int)",
            &params(&["year"]),
        )
        .expect("parses");
        assert_eq!(query.names, ["subject", "year"]);
        assert_eq!(
            query.text('$'),
            "SELECT ':subject', \"a:b\", x::text -- :year\n FROM t /* :subject */ WHERE id = $1 AND ($2 IS NULL OR y = $2::int)"
        );
        assert_eq!(
            query.text('?'),
            "SELECT ':subject', \"a:b\", x::text -- :year\n FROM t /* :subject */ WHERE id = ?1 AND (?2 IS NULL OR y = ?2::int)"
        );
    }

    #[test]
    fn an_undeclared_name_or_broken_quoting_is_refused() {
        assert!(
            BoundQuery::parse("SELECT 1 WHERE a = :plate", &params(&[]))
                .expect_err("undeclared")
                .contains(":plate")
        );
        assert!(BoundQuery::parse("SELECT 'x WHERE a = :subject", &params(&[])).is_err());
        assert!(BoundQuery::parse("SELECT 1 /* WHERE a = :subject", &params(&[])).is_err());
    }

    #[test]
    fn a_url_with_a_password_or_cleartext_to_another_host_is_refused() {
        assert!(check_postgres_url("postgres://u:secret@db.internal/x", true).is_err());
        assert!(check_postgres_url("postgres://u@db.internal/x", false).is_err());
        assert!(check_postgres_url("postgres://u@db.internal/x", true).is_ok());
        assert!(check_postgres_url("postgres://u@127.0.0.1:5432/x", false).is_ok());
    }
}
