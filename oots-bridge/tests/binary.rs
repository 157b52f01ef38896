//! The bridge as it ships: `onceonly-oots-bridge serve` with a
//! configuration made from the sample files, against a real broker and
//! register and a fake Domibus WS plugin; it answers, and stops on
//! SIGTERM with exit code 0. `check` names the file and the fix.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::access_point::{AccessPoint, document, retrieved, serve, submitted};
use common::world::admit_bridge;
use common::{ID, asked};
use onceonly_integration_tests::world::World;

const BIN: &str = env!("CARGO_BIN_EXE_onceonly-oots-bridge");

fn sample(name: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(name),
    )
    .expect("the sample")
}

/// The sample `bridge.toml` pointed at `world`'s PKI and broker and the
/// access point at `endpoint`, polling often.
fn configure(world: &World, dir: &std::path::Path, endpoint: &str) -> std::path::PathBuf {
    let pki = world
        .pki
        .ca_cert_path()
        .parent()
        .expect("pki dir")
        .to_owned();
    let mut text = sample("bridge.toml");
    for (from, to) in [
        ("\"../../pki/".to_owned(), format!("\"{}/", pki.display())),
        (
            "broker = \"127.0.0.1:7443\"".to_owned(),
            format!("broker = \"{}\"", world.broker_addr()),
        ),
        (
            "endpoint = \"http://127.0.0.1:8080/domibus/services/wsplugin\"".to_owned(),
            format!("endpoint = \"{endpoint}\""),
        ),
        (
            "poll_interval = \"2s\"".to_owned(),
            "poll_interval = \"100ms\"".to_owned(),
        ),
    ] {
        assert!(text.contains(&from), "the sample holds {from}");
        text = text.replace(&from, &to);
    }
    std::fs::write(dir.join("mapping.toml"), sample("mapping.toml")).expect("mapping");
    let path = dir.join("bridge.toml");
    std::fs::write(&path, text).expect("bridge.toml");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_binary_answers_from_the_sample_configuration_and_stops_on_sigterm() {
    let world = World::start().await;
    admit_bridge(&world);

    let dir = tempfile::tempdir().expect("dir");
    let point = Arc::new(AccessPoint::default());
    let endpoint = serve(point.clone()).await;
    let config = configure(&world, dir.path(), &endpoint);

    let checked = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("runs");
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );

    point
        .pending
        .lock()
        .expect("lock")
        .push(("m1".to_owned(), retrieved(&asked(&[]), "conv-1")));
    let mut bridge = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while submitted(&point).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no answer from the bridge"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer = &submitted(&point)[0];
    assert_eq!(
        answer.action,
        "ExecuteQueryResponse",
        "{}",
        document(answer)
    );
    assert!(document(answer).contains(ID));

    let status = Command::new("kill")
        .args(["-TERM", &bridge.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let exited = loop {
        if let Some(exited) = bridge.try_wait().expect("wait") {
            break exited;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bridge did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exited.success(), "{exited:?}");

    // A configuration with an error: the file, the key and the fix.
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&config)
            .expect("config")
            .replace(&endpoint, "ftp://127.0.0.1/x"),
    )
    .expect("write");
    let refused = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&broken)
        .output()
        .expect("runs");
    assert_eq!(refused.status.code(), Some(1));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("broken.toml")
            && said.contains("access_point.endpoint")
            && said.contains("http://"),
        "{said}"
    );
}
