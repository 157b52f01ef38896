//! The mapping file as staff write it: errors name the file, the line and
//! the fix; a reload that fails keeps the old mapping serving; `check` and
//! `try` work before anyone is connected.

use std::path::{Path, PathBuf};
use std::process::Command;

use onceonly_connector::lookup::{LookupError, Values};
use onceonly_connector::{GenericConnector, Loaded, Mapping};

const SQL: &str = include_str!("../config/school.sql");
const MAPPING: &str = include_str!("../config/school-mapping.toml");

/// The shipped sample in `dir`: school.db, the mapping (edited), and a
/// connector configuration around it (with throw-away TLS files).
fn sample(dir: &Path, edit: impl Fn(&str) -> String) -> PathBuf {
    let database = dir.join("school.db");
    if !database.exists() {
        rusqlite::Connection::open(&database)
            .expect("db")
            .execute_batch(SQL)
            .expect("sql");
    }
    let mapping = dir.join("school-mapping.toml");
    std::fs::write(&mapping, edit(MAPPING)).expect("mapping");
    mapping
}

fn config(dir: &Path, pki: &onceonly_certs::Pki) -> PathBuf {
    let files = pki.tls_files(onceonly_certs::Role::Connector, "school-register");
    let text = format!(
        "mapping = \"school-mapping.toml\"\n[connector]\nlisten = \"127.0.0.1:0\"\nallowed_broker_id = \"broker\"\n[connector.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\ncrl = {:?}\n",
        files.ca,
        files.cert,
        files.key,
        pki.crl_path()
    );
    let path = dir.join("school.toml");
    std::fs::write(&path, text).expect("config");
    path
}

fn error_of(dir: &Path, edit: impl Fn(&str) -> String) -> String {
    let path = sample(dir, edit);
    Mapping::load(&path).expect_err("refused").to_string()
}

#[test]
fn the_shipped_mapping_loads() {
    let dir = tempfile::tempdir().expect("dir");
    let mapping = Mapping::load(&sample(dir.path(), str::to_owned)).expect("valid");
    assert_eq!(mapping.evidence_types.len(), 1);
}

#[test]
fn errors_name_the_file_the_line_and_the_fix() {
    let dir = tempfile::tempdir().expect("dir");
    let line_of = |text: &str, needle: &str| {
        text.lines()
            .position(|l| l.contains(needle))
            .map(|n| n + 1)
            .expect("needle")
    };
    // An unknown source.
    let edited = MAPPING.replace("source = \"schools\"", "source = \"school\"");
    let error = error_of(dir.path(), |_| edited.clone());
    let line = line_of(&edited, "source = \"school\"");
    assert!(
        error.contains(&format!("school-mapping.toml:{line}:")),
        "{error}"
    );
    assert!(error.contains("no source named \"school\""), "{error}");
    assert!(error.contains("[sources.school]"), "the fix: {error}");

    // A placeholder that is not declared.
    let edited = MAPPING.replace(":year IS NULL", ":yaer IS NULL");
    let error = error_of(dir.path(), |_| edited.clone());
    assert!(error.contains(":yaer"), "{error}");
    assert!(
        error.contains(&format!(
            "school-mapping.toml:{}:",
            line_of(&edited, "query = \"\"\"")
        )),
        "{error}"
    );

    // A query that does not select by the subject.
    let edited = MAPPING.replace("WHERE idnr = :subject AND", "WHERE");
    assert!(error_of(dir.path(), |_| edited.clone()).contains("never uses :subject"));

    // A media type no template makes, a template that does not parse, TOML
    // that does not parse, an unknown key.
    let edited = MAPPING.replace(
        "media_type = \"application/json\"",
        "media_type = \"application/pdf\"",
    );
    let error = error_of(dir.path(), |_| edited.clone());
    assert!(
        error.contains(&format!(":{}:", line_of(&edited, "application/pdf"))),
        "{error}"
    );
    let edited = MAPPING.replace("{{ school }}", "{{ school }");
    assert!(error_of(dir.path(), |_| edited.clone()).contains("template"));
    let edited = MAPPING.replace("kind = \"sqlite\"", "kind = \"oracle\"");
    let error = error_of(dir.path(), |_| edited.clone());
    assert!(
        error.contains(&format!(":{}:", line_of(&edited, "oracle"))) || error.contains("oracle"),
        "{error}"
    );
    let edited = MAPPING.replace("timeout = \"2s\"", "timeout = \"2s\"\ncolour = \"red\"");
    assert!(error_of(dir.path(), |_| edited.clone()).contains("colour"));
}

#[tokio::test]
async fn lookups_find_one_refuse_none_and_several_and_bind_hostile_values() {
    let dir = tempfile::tempdir().expect("dir");
    let loaded = Loaded::load(&sample(dir.path(), str::to_owned)).expect("loads");
    let lookup = |subject: &str, year: Option<&str>| {
        let mut parameters = std::collections::BTreeMap::new();
        if let Some(year) = year {
            parameters.insert("year".to_owned(), year.to_owned());
        }
        let values = Values::new(subject, &parameters);
        let loaded = &loaded;
        async move {
            loaded
                .lookup("school-leaving-certificate", &values, None)
                .await
        }
    };
    let anna = lookup("82281866209", None).await.expect("found");
    let document: serde_json::Value = serde_json::from_slice(&anna.bytes).expect("JSON");
    assert_eq!(document["school"], "Heinrich-Hertz-Gymnasium Berlin");
    assert_eq!(document["holder"]["idnr"], "82281866209");
    assert_eq!(anna.media_type, "application/json");
    assert_eq!(
        lookup("10407933793", None).await,
        Err(LookupError::NotFound)
    );
    assert_eq!(
        lookup("47782602413", None).await,
        Err(LookupError::Ambiguous)
    );
    let one = lookup("47782602413", Some("2015")).await.expect("one");
    assert!(String::from_utf8_lossy(&one.bytes).contains("Kolleg Hamburg"));
    for hostile in [
        "' OR '1'='1",
        "2015' --",
        "2015; DROP TABLE certificates; --",
        "2015 OR 1=1",
        "%",
        "_",
        "20%",
        "/* */2015",
        "２０１５",
        "Ⅹ",
        &"9".repeat(5000),
    ] {
        for subject in ["47782602413", "' OR idnr LIKE '%"] {
            let got = lookup(subject, Some(hostile)).await;
            assert!(
                matches!(got, Err(LookupError::NotFound)),
                "{subject:?} / {hostile:?} gave {got:?}"
            );
        }
    }
    assert!(
        lookup("82281866209", None).await.is_ok(),
        "the table is still there"
    );
}

#[tokio::test]
async fn a_slow_query_is_stopped_at_the_timeout() {
    let dir = tempfile::tempdir().expect("dir");
    let slow = MAPPING.replace(
        "FROM certificates\n",
        "FROM certificates, (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 1000000000) SELECT count(*) AS n FROM c)\n",
    )
    .replace("timeout = \"2s\"", "timeout = \"200ms\"");
    let loaded = Loaded::load(&sample(dir.path(), |_| slow.clone())).expect("loads");
    let started = std::time::Instant::now();
    let got = loaded
        .lookup(
            "school-leaving-certificate",
            &Values::new("82281866209", &std::collections::BTreeMap::new()),
            None,
        )
        .await;
    assert_eq!(got, Err(LookupError::TooSlow));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_reload_that_fails_keeps_the_old_mapping_and_one_that_changes_the_offer_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let path = sample(dir.path(), str::to_owned);
    let connector = GenericConnector::load(&path).expect("loads");
    // Broken: refused with its line; the old mapping stays.
    std::fs::write(
        &path,
        MAPPING.replace("source = \"schools\"", "source = \"nowhere\""),
    )
    .expect("edit");
    let error = connector.reload().expect_err("broken").to_string();
    assert!(error.contains("school-mapping.toml:"), "{error}");
    assert_eq!(
        connector.current().mapping.evidence_types["school-leaving-certificate"].source,
        "schools"
    );
    // Another set of evidence types needs a restart.
    std::fs::write(
        &path,
        MAPPING.replace("school-leaving-certificate", "school-report"),
    )
    .expect("edit");
    assert!(
        connector
            .reload()
            .expect_err("offer")
            .to_string()
            .contains("restart")
    );
    // A template change is taken.
    std::fs::write(&path, MAPPING.replace("\"overall_grade\"", "\"grade\"")).expect("edit");
    connector.reload().expect("a valid edit");
    assert!(
        connector.current().mapping.evidence_types["school-leaving-certificate"]
            .template
            .contains("\"grade\"")
    );
}

#[test]
fn check_and_try_work_without_a_broker() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = onceonly_certs::Pki::throwaway(
        "onceonly.test",
        &[(onceonly_certs::Role::Connector, "school-register")],
    )
    .expect("pki");
    sample(dir.path(), str::to_owned);
    let config = config(dir.path(), &pki);
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_onceonly-connector"))
            .args(args)
            .output()
            .expect("runs")
    };
    let config = config.to_str().expect("utf-8");
    let check = run(&["check", "--config", config]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains("1 queries prepared"));
    let tried = run(&[
        "try",
        "--config",
        config,
        "school-leaving-certificate",
        "47782602413",
        "year=2012",
    ]);
    assert!(
        tried.status.success(),
        "{}",
        String::from_utf8_lossy(&tried.stderr)
    );
    assert!(String::from_utf8_lossy(&tried.stdout).contains("Abendgymnasium Köln"));
    let ambiguous = run(&[
        "try",
        "--config",
        config,
        "school-leaving-certificate",
        "47782602413",
    ]);
    assert_eq!(ambiguous.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&ambiguous.stderr).contains("several records"));

    // A query that names a column the table lacks: the file is valid, the
    // database says no, and check says where.
    std::fs::write(
        dir.path().join("school-mapping.toml"),
        MAPPING.replace("SELECT name,", "SELECT nme,"),
    )
    .expect("edit");
    let check = run(&["check", "--config", config]);
    assert_eq!(check.status.code(), Some(1));
    let said = String::from_utf8_lossy(&check.stderr);
    assert!(
        said.contains("school-mapping.toml:") && said.contains("nme"),
        "{said}"
    );
}

/// The binary as the unit runs it: SIGHUP with a broken mapping is refused
/// and logged, the fixed one is taken, SIGTERM ends it.
#[test]
fn sighup_reloads_the_mapping_and_refuses_a_broken_one() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().expect("dir");
    let pki = onceonly_certs::Pki::throwaway(
        "onceonly.test",
        &[(onceonly_certs::Role::Connector, "school-register")],
    )
    .expect("pki");
    let mapping = sample(dir.path(), str::to_owned);
    let config = config(dir.path(), &pki);
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_onceonly-connector"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starts"),
    );
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = child.0.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let wait_for = |needle: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(_) => panic!("no line with {needle:?}"),
            }
        }
    };
    wait_for("serving as");
    let signal = |name: &str| {
        assert!(
            Command::new("kill")
                .arg(format!("-{name}"))
                .arg(child.0.id().to_string())
                .status()
                .expect("kill")
                .success()
        );
    };
    std::fs::write(
        &mapping,
        MAPPING.replace("source = \"schools\"", "source = \"nowhere\""),
    )
    .expect("edit");
    signal("HUP");
    let refused = wait_for("mapping NOT reloaded");
    assert!(refused.contains("school-mapping.toml:"), "{refused}");
    std::fs::write(&mapping, MAPPING.replace("\"overall_grade\"", "\"grade\"")).expect("edit");
    signal("HUP");
    wait_for("mapping reloaded");
    signal("TERM");
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "no exit after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A child process killed when the test ends, passed or not.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
