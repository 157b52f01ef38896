//! The tests' own PostgreSQL server (the ground issue 15's replica tests
//! stand on): it starts from nothing in a temporary directory, answers on
//! loopback only, and can be stopped and started again under a client.

use onceonly_integration_tests::postgres::TestPostgres;

async fn version(url: &str) -> Result<String, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let row = client.query_one("SELECT version()", &[]).await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn a_test_server_starts_stops_and_starts_again_on_its_port() {
    let server = tokio::task::spawn_blocking(TestPostgres::start)
        .await
        .expect("join")
        .expect("PostgreSQL starts");
    let url = server.url("postgres");
    let first = version(&url).await.expect("connects");
    assert!(first.starts_with("PostgreSQL "), "{first}");

    // Loopback only: the port does not answer on another local address.
    let listening = std::fs::read_to_string("/proc/net/tcp").expect("tcp table");
    let port_hex = format!(":{:04X}", server.port());
    let bound: Vec<&str> = listening
        .lines()
        .filter(|line| {
            line.split_whitespace()
                .nth(1)
                .is_some_and(|a| a.ends_with(&port_hex))
        })
        .collect();
    assert!(!bound.is_empty(), "nothing listens on {port_hex}");
    assert!(
        bound.iter().all(|line| line
            .split_whitespace()
            .nth(1)
            .is_some_and(|a| a.starts_with("0100007F"))),
        "listens beyond 127.0.0.1: {bound:?}"
    );

    let server = tokio::task::spawn_blocking(move || {
        server.stop().expect("stops");
        server
    })
    .await
    .expect("join");
    assert!(version(&url).await.is_err(), "answers while stopped");

    let server = tokio::task::spawn_blocking(move || {
        server.start_again().expect("starts again");
        server
    })
    .await
    .expect("join");
    assert_eq!(version(&url).await.expect("connects again"), first);
    drop(server);
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connects");
    tokio::spawn(connection);
    client
}

async fn fresh_database(server: &TestPostgres, name: &str) -> String {
    connect(&server.url("postgres"))
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    server.url(name)
}

#[tokio::test]
async fn replicas_starting_at_once_apply_each_migration_once_and_refuse_an_altered_or_newer_schema()
{
    use onceonly_store_postgres::{MIGRATIONS, MIGRATIONS_TABLE, MigrationError, Mode, migrate};
    let server = tokio::task::spawn_blocking(TestPostgres::start)
        .await
        .expect("join")
        .expect("PostgreSQL starts");
    let latest = MIGRATIONS.last().expect("migrations").version;

    // Check mode on an empty database changes nothing and names what lacks.
    let url = fresh_database(&server, "checked").await;
    let mut client = connect(&url).await;
    match migrate(&mut client, Mode::Check).await {
        Err(MigrationError::Missing { missing }) => assert_eq!(missing.last(), Some(&latest)),
        other => panic!("check mode on an empty database: {other:?}"),
    }
    let table: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&MIGRATIONS_TABLE])
        .await
        .expect("query")
        .get(0);
    assert!(!table, "check mode created the migrations table");

    // Four replicas at once: each migration applied exactly once.
    let url = fresh_database(&server, "shared").await;
    let mut starts = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        starts.push(tokio::spawn(async move {
            let mut client = connect(&url).await;
            migrate(&mut client, Mode::Apply).await.expect("migrates")
        }));
    }
    let mut applied = Vec::new();
    for start in starts {
        let state = start.await.expect("join");
        assert_eq!(state.version, latest);
        applied.extend(state.applied);
    }
    applied.sort();
    let all: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(applied, all, "every migration once, by one of the four");
    let mut client = connect(&url).await;
    assert_eq!(
        migrate(&mut client, Mode::Check)
            .await
            .expect("up to date")
            .applied,
        Vec::<i32>::new()
    );
    // The schema is there: a consent row goes in.
    client
        .execute(
            "INSERT INTO consents VALUES ('c-1', 1, 'ab', 'sealed', 'spiffe://t/authority/a', 'birth-certificate', 'p', 0, 1, NULL, 'spiffe://t/portal/p')",
            &[],
        )
        .await
        .expect("the consents table");

    // An applied migration edited afterwards: refused, by version.
    client
        .execute(
            &format!("UPDATE {MIGRATIONS_TABLE} SET checksum = 'edited' WHERE version = 1"),
            &[],
        )
        .await
        .expect("update");
    match migrate(&mut client, Mode::Apply).await {
        Err(e @ MigrationError::Altered { version: 1, .. }) => {
            assert!(e.to_string().contains("new migration"), "{e}")
        }
        other => panic!("an altered migration: {other:?}"),
    }
    let expected = MIGRATIONS[0].checksum();
    client
        .execute(
            &format!("UPDATE {MIGRATIONS_TABLE} SET checksum = $1 WHERE version = 1"),
            &[&expected],
        )
        .await
        .expect("restore");

    // A database a newer release migrated: refused, naming both versions.
    client
        .execute(
            &format!("INSERT INTO {MIGRATIONS_TABLE} (version, name, checksum) VALUES ($1, 'from-the-future', 'x')"),
            &[&(latest + 1)],
        )
        .await
        .expect("insert");
    match migrate(&mut client, Mode::Apply).await {
        Err(MigrationError::Ahead { database, known }) => {
            assert_eq!((database, known), (latest + 1, latest))
        }
        other => panic!("a newer schema: {other:?}"),
    }
}
