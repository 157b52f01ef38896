//! `onceonly-connector` behind a real broker: the school register served
//! from SQLite (the shipped sample), from a real PostgreSQL server the test
//! starts, and from a real HTTPS JSON API the test serves. Each lookup's
//! outcome reaches the authority with its status and reason, and leaves
//! its record at the broker: found, not found, ambiguous, source down,
//! source too slow; hostile values never return another person's record.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use onceonly_connector::GenericConnector;
use onceonly_integration_tests::postgres::TestPostgres;
use onceonly_integration_tests::school::{
    BAFOEG, NO_CERTIFICATE, SCHOOL_MAPPING, SCHOOL_REGISTER, SCHOOL_SQL, TWO_CERTIFICATES,
    school_leaving_certificate,
};
use onceonly_integration_tests::start_connector;
use onceonly_integration_tests::world::{ANNA, World};
use onceonly_proto::status::reason_of;
use onceonly_proto::v1::{
    AuditRecord, ErrorReason, ExchangeOutcome, RequestEvidenceRequest, RequestEvidenceResponse,
};
use tonic::{Code, Status};

const PATIENCE: Duration = Duration::from_secs(20);

async fn ask(
    world: &World,
    request: RequestEvidenceRequest,
) -> Result<RequestEvidenceResponse, Status> {
    world
        .authority(BAFOEG)
        .request_evidence(request)
        .await
        .map(tonic::Response::into_inner)
}

fn with_year(mut request: RequestEvidenceRequest, year: &str) -> RequestEvidenceRequest {
    request.parameters = HashMap::from([("year".to_owned(), year.to_owned())]);
    request
}

async fn record(world: &World, request_id: &str) -> AuditRecord {
    let records = world.wait_for_records(request_id, 1, PATIENCE).await;
    assert_eq!(records.len(), 1, "{request_id}: {records:?}");
    records.into_iter().next().expect("one")
}

/// Asks, expects `code` and `reason`, and finds them in the record too.
async fn refused(world: &World, request: RequestEvidenceRequest, code: Code, reason: ErrorReason) {
    let request_id = request.request_id.clone();
    let status = ask(world, request).await.expect_err("refused");
    assert_eq!(status.code(), code, "{request_id}: {status:?}");
    assert_eq!(reason_of(&status), Some(reason), "{request_id}: {status:?}");
    let record = record(world, &request_id).await;
    assert_eq!(record.status_code, code as i32, "{record:?}");
    assert_eq!(record.error_reason(), reason, "{record:?}");
    assert!(record.payload_sha256.is_empty());
}

/// Anna's certificate is delivered; its document is the register's.
async fn delivered(world: &World, request_id: &str, school: &str) {
    let answer = ask(world, school_leaving_certificate(request_id, ANNA))
        .await
        .expect("delivered");
    let evidence = answer.evidence.expect("evidence");
    assert_eq!(evidence.media_type, "application/json");
    let document: serde_json::Value = serde_json::from_slice(&evidence.payload).expect("JSON");
    assert_eq!(document["school"], school, "{document}");
    assert_eq!(document["holder"]["idnr"], ANNA);
    assert!(!evidence.register_jws.is_empty(), "signed by the register");
    let record = record(world, request_id).await;
    assert_eq!(record.outcome(), ExchangeOutcome::Delivered);
    assert_eq!(record.connector_id, SCHOOL_REGISTER);
}

/// The matrix every source must pass, through the broker.
async fn found_not_found_ambiguous_and_hostile(world: &World, tag: &str, anna_school: &str) {
    delivered(world, &format!("{tag}-found"), anna_school).await;
    refused(
        world,
        school_leaving_certificate(&format!("{tag}-none"), NO_CERTIFICATE),
        Code::NotFound,
        ErrorReason::SubjectNotFound,
    )
    .await;
    refused(
        world,
        school_leaving_certificate(&format!("{tag}-two"), TWO_CERTIFICATES),
        Code::FailedPrecondition,
        ErrorReason::AmbiguousSubject,
    )
    .await;
    let one = ask(
        world,
        with_year(
            school_leaving_certificate(&format!("{tag}-year"), TWO_CERTIFICATES),
            "2015",
        ),
    )
    .await
    .expect("the year tells them apart");
    let payload = one.evidence.expect("evidence").payload;
    assert!(String::from_utf8_lossy(&payload).contains("Kolleg Hamburg"));
    for (n, hostile) in [
        "' OR '1'='1",
        "2015' --",
        "2015; DROP TABLE certificates; --",
        "2015 OR 1=1",
        "%",
        "_",
        "/* */ 2015",
        "２０１５",
        "Straße",
    ]
    .into_iter()
    .enumerate()
    {
        let request_id = format!("{tag}-hostile-{n}");
        let status = ask(
            world,
            with_year(
                school_leaving_certificate(&request_id, TWO_CERTIFICATES),
                hostile,
            ),
        )
        .await
        .expect_err("no record for a hostile value");
        assert!(
            matches!(status.code(), Code::NotFound | Code::InvalidArgument),
            "{hostile:?}: {status:?}"
        );
        record(world, &request_id).await;
    }
    let long = ask(
        world,
        with_year(
            school_leaving_certificate(&format!("{tag}-long"), TWO_CERTIFICATES),
            &"9".repeat(10_000),
        ),
    )
    .await
    .expect_err("too long");
    assert!(
        matches!(long.code(), Code::NotFound | Code::InvalidArgument),
        "{long:?}"
    );
    delivered(world, &format!("{tag}-still-there"), anna_school).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_the_shipped_sample() {
    let world = World::start().await;
    found_not_found_ambiguous_and_hostile(&world, "sqlite", "Heinrich-Hertz-Gymnasium Berlin")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_too_slow_is_deadline_exceeded() {
    let mut world = World::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let mapping = onceonly_integration_tests::school::lay_out(dir.path());
    let slow = SCHOOL_MAPPING
        .replace(
            "FROM certificates\n",
            "FROM certificates, (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 1000000000) SELECT count(*) AS n FROM c)\n",
        )
        .replace("timeout = \"2s\"", "timeout = \"300ms\"");
    std::fs::write(&mapping, slow).expect("mapping");
    serve_school(&mut world, &mapping).await;
    refused(
        &world,
        school_leaving_certificate("sqlite-slow", ANNA),
        Code::DeadlineExceeded,
        ErrorReason::DeadlineExceeded,
    )
    .await;
    assert!(record(&world, "sqlite-slow").await.register_contacted);
}

/// Serves the school register from `mapping` in place of the sample.
async fn serve_school(world: &mut World, mapping: &std::path::Path) {
    let connector = GenericConnector::load(mapping).expect("the mapping loads");
    let running = start_connector(&world.pki, SCHOOL_REGISTER, connector).await;
    world.replace_register(SCHOOL_REGISTER, running).await;
}

/// The shipped mapping with its source replaced by `source` (a TOML
/// table body) and its query by `query`.
fn mapping_with(source: &str, query: &str) -> String {
    let start = SCHOOL_MAPPING.find("[sources.schools]").expect("source");
    let end = SCHOOL_MAPPING.find("[[evidence_types]]").expect("types");
    let mapping = format!(
        "{}[sources.schools]\n{source}\n{}",
        &SCHOOL_MAPPING[..start],
        &SCHOOL_MAPPING[end..]
    );
    let query_start = mapping.find("query = \"\"\"").expect("query");
    let query_end = query_start + mapping[query_start..].find("\"\"\"\n#").expect("end") + 4;
    format!(
        "{}query = \"\"\"\n{query}\n\"\"\"\n{}",
        &mapping[..query_start],
        &mapping[query_end..]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_found_not_found_ambiguous_hostile_slow_and_down() {
    let postgres = tokio::task::spawn_blocking(TestPostgres::start)
        .await
        .expect("join")
        .expect("PostgreSQL starts");
    let url = postgres.url("postgres");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connects");
    tokio::spawn(connection);
    client
        .batch_execute(SCHOOL_SQL)
        .await
        .expect("the sample data");
    let mut world = World::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let mapping = dir.path().join("school-mapping.toml");
    let source = format!("kind = \"postgres\"\nurl = \"{url}\"\ntimeout = \"2s\"\n");
    // Compared as text: a value that is no number matches nothing, and
    // raises nothing.
    let query = "SELECT name, birth_date, school, year, grade FROM certificates WHERE idnr = :subject AND (:year IS NULL OR year::text = :year)";
    std::fs::write(&mapping, mapping_with(&source, query)).expect("mapping");
    serve_school(&mut world, &mapping).await;
    found_not_found_ambiguous_and_hostile(&world, "pg", "Heinrich-Hertz-Gymnasium Berlin").await;

    // A value the query casts and cannot: INVALID_ARGUMENT, recorded.
    let casting = "SELECT name, birth_date, school, year, grade FROM certificates WHERE idnr = :subject AND (:year IS NULL OR year = :year::int)";
    std::fs::write(&mapping, mapping_with(&source, casting)).expect("mapping");
    serve_school(&mut world, &mapping).await;
    refused(
        &world,
        with_year(
            school_leaving_certificate("pg-cast", TWO_CERTIFICATES),
            "2015'; --",
        ),
        Code::InvalidArgument,
        ErrorReason::InvalidRequest,
    )
    .await;

    // Slower than the source's timeout: the server cancels the statement.
    let slow_source = format!("kind = \"postgres\"\nurl = \"{url}\"\ntimeout = \"300ms\"\n");
    let slow = "SELECT name, birth_date, school, year, grade FROM certificates WHERE idnr = :subject AND (:year IS NULL OR year::text = :year) AND (SELECT 1 FROM pg_sleep(3)) = 1";
    std::fs::write(&mapping, mapping_with(&slow_source, slow)).expect("mapping");
    serve_school(&mut world, &mapping).await;
    refused(
        &world,
        school_leaving_certificate("pg-slow", ANNA),
        Code::DeadlineExceeded,
        ErrorReason::DeadlineExceeded,
    )
    .await;

    // The database down.
    std::fs::write(&mapping, mapping_with(&source, query)).expect("mapping");
    serve_school(&mut world, &mapping).await;
    tokio::task::block_in_place(|| postgres.stop()).expect("PostgreSQL stops");
    refused(
        &world,
        school_leaving_certificate("pg-down", ANNA),
        Code::Unavailable,
        ErrorReason::ConnectorUnavailable,
    )
    .await;
}

/// The register's internal JSON API, over TLS with a certificate of its
/// own CA, behind a bearer token: `GET /persons/{idnr}/certificates?year=`
/// answers `{"items": [...]}`; subject `SLOW` takes 5 s.
struct Api {
    addr: SocketAddr,
    ca_pem: String,
    task: tokio::task::JoinHandle<()>,
    seen_paths: Arc<std::sync::Mutex<Vec<String>>>,
}

const TOKEN: &str = "register-api-token-7f3a";
const SLOW: &str = "21641045750";

async fn start_api() -> Api {
    use axum::extract::{Path, Query, Request};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::get;

    let rows: Vec<serde_json::Value> = vec![
        serde_json::json!({"idnr": ANNA, "name": "Anna Lena Schneider", "birth_date": "1990-04-12", "school": "Lessing-Gymnasium (API)", "year": 2009, "grade": "1,7"}),
        serde_json::json!({"idnr": TWO_CERTIFICATES, "name": "Mehmet Yılmaz", "birth_date": "1992-02-28", "school": "Abendgymnasium Köln", "year": 2012, "grade": "2,8"}),
        serde_json::json!({"idnr": TWO_CERTIFICATES, "name": "Mehmet Yılmaz", "birth_date": "1992-02-28", "school": "Kolleg Hamburg", "year": 2015, "grade": "1,9"}),
        serde_json::json!({"idnr": SLOW, "name": "Jonas Weber", "birth_date": "1985-11-03", "school": "Goethe-Gymnasium", "year": 2004, "grade": "2,3"}),
    ];
    let rows = Arc::new(rows);
    let seen_paths = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = seen_paths.clone();
    let router = axum::Router::new()
        .route(
            "/persons/{idnr}/certificates",
            get(
                move |Path(idnr): Path<String>,
                      Query(query): Query<HashMap<String, String>>,
                      headers: HeaderMap| {
                    let rows = rows.clone();
                    async move {
                        if headers.get("authorization").and_then(|v| v.to_str().ok())
                            != Some(&format!("Bearer {TOKEN}"))
                        {
                            return (StatusCode::UNAUTHORIZED, axum::Json(serde_json::json!({})));
                        }
                        if idnr == SLOW {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                        let items: Vec<serde_json::Value> = rows
                            .iter()
                            .filter(|r| r["idnr"] == idnr.as_str())
                            .filter(|r| {
                                query.get("year").is_none_or(|y| {
                                    y.is_empty()
                                        || r["year"]
                                            .as_i64()
                                            .is_some_and(|year| year.to_string() == *y)
                                })
                            })
                            .cloned()
                            .collect();
                        (
                            StatusCode::OK,
                            axum::Json(serde_json::json!({ "items": items })),
                        )
                    }
                },
            ),
        )
        .layer(axum::middleware::from_fn(
            move |request: Request, next: axum::middleware::Next| {
                let seen = seen.clone();
                async move {
                    seen.lock()
                        .expect("paths")
                        .push(request.uri().path().to_owned());
                    next.run(request).await
                }
            },
        ));

    // The API's own CA and certificate, for 127.0.0.1.
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.subject_alt_names = vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())];
    let cert = params.signed_by(&key, &issuer).expect("cert");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .expect("server config");
    let (addr, task) = onceonly_integration_tests::serve_router_tls(router, config).await;
    Api {
        addr,
        ca_pem: ca.pem(),
        task,
        seen_paths,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_found_not_found_ambiguous_hostile_slow_and_down() {
    let api = start_api().await;
    let mut world = World::start().await;
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("api-ca.pem"), &api.ca_pem).expect("ca");
    std::fs::write(dir.path().join("api.token"), format!("{TOKEN}\n")).expect("token");
    let source = format!(
        "kind = \"http\"\nbase_url = \"https://{}\"\nca = \"api-ca.pem\"\nbearer_token_file = \"api.token\"\ntimeout = \"1s\"\n",
        api.addr
    );
    let mapping = mapping_with(&source, "unused")
        .replace(
            "query = \"\"\"\nunused\n\"\"\"\n",
            "request = { path = \"/persons/{subject}/certificates\", query = { year = \"{year}\" } }\nresults = \"/items\"\n",
        );
    let path = dir.path().join("school-mapping.toml");
    std::fs::write(&path, mapping).expect("mapping");
    serve_school(&mut world, &path).await;
    found_not_found_ambiguous_and_hostile(&world, "http", "Lessing-Gymnasium (API)").await;
    // Each value reached the API as one path segment, whatever it held.
    assert!(
        api.seen_paths
            .lock()
            .expect("paths")
            .iter()
            .all(|p| p.starts_with("/persons/")
                && p.ends_with("/certificates")
                && p.matches('/').count() == 3),
        "{:?}",
        api.seen_paths.lock().expect("paths")
    );

    refused(
        &world,
        school_leaving_certificate("http-slow", SLOW),
        Code::DeadlineExceeded,
        ErrorReason::DeadlineExceeded,
    )
    .await;
    api.task.abort();
    // The listener goes with the task; wait until the port refuses.
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(api.addr).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    refused(
        &world,
        school_leaving_certificate("http-down", ANNA),
        Code::Unavailable,
        ErrorReason::ConnectorUnavailable,
    )
    .await;
}
