//! The bridge as it ships: started from the command lines of its systemd
//! unit (`deploy/onceonly-oots-bridge.service`: `check` before, `serve`)
//! with a configuration made from the sample files where the unit looks
//! for it, against a real broker and register and a fake Domibus WS
//! plugin; it answers, and stops on SIGTERM with exit code 0. `check`
//! names the file and the fix.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::access_point::{AccessPoint, document, retrieved, serve, submitted};
use common::world::admit_bridge;
use common::{ID, asked, error_of, https_get, preview_location};
use onceonly_certs::identity::Role;
use onceonly_integration_tests::world::World;

const BIN: &str = env!("CARGO_BIN_EXE_onceonly-oots-bridge");
const UNIT: &str = "onceonly-oots-bridge.service";

/// The unit's `key` command line (`ExecStartPre`, `ExecStart`), its
/// `/etc/onceonly` at `etc`.
fn unit(etc: &std::path::Path, key: &str) -> Command {
    onceonly_integration_tests::deployed::unit_command(UNIT, key, "", etc)
}

/// Sends SIGTERM to `bridge` and asserts that it exits 0 within 10 s.
async fn stops_on_sigterm(bridge: &mut std::process::Child) {
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
}

/// Puts the reference request at `point`, starts the shipped binary as
/// its unit does (configuration under `etc`), and waits for its answer.
async fn serve_first_request(point: &AccessPoint, etc: &std::path::Path) -> std::process::Child {
    point
        .pending
        .lock()
        .expect("lock")
        .push(("m1".to_owned(), retrieved(&asked(&[]), "conv-1")));
    let bridge = unit(etc, "ExecStart")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starts");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while submitted(point).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no answer from the bridge"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bridge
}

fn sample(name: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(name),
    )
    .expect("the sample")
}

/// The sample `bridge.toml` pointed at `world`'s PKI and broker and the
/// access point at `endpoint`, polling often, written where the unit
/// looks for it with `etc` for `/etc/onceonly`.
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
    let folder = dir.join("oots-bridge");
    std::fs::create_dir_all(&folder).expect("oots-bridge/");
    std::fs::write(folder.join("mapping.toml"), sample("mapping.toml")).expect("mapping");
    let path = folder.join("bridge.toml");
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

    let checked = unit(dir.path(), "ExecStartPre").output().expect("runs");
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );

    let mut bridge = serve_first_request(&point, dir.path()).await;
    let answer = &submitted(&point)[0];
    assert_eq!(
        answer.action,
        "ExecuteQueryResponse",
        "{}",
        document(answer)
    );
    assert!(document(answer).contains(ID));

    stops_on_sigterm(&mut bridge).await;

    // A configuration with an error: the file, the key and the fix.
    let broken = config.with_file_name("broken.toml");
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

/// The sample's `[preview]` section switched on, at `port`, with the
/// broker's certificate (the test CA's) as the site's; the mapping asking
/// for the preview.
fn with_preview(world: &World, config: &std::path::Path, port: u16) {
    let text = std::fs::read_to_string(config).expect("config");
    let (before, after) = text
        .split_once("# [preview]")
        .expect("the sample's [preview]");
    let mut switched_on = String::from(before);
    switched_on.push_str("[preview]\n");
    for line in after.lines() {
        match line.strip_prefix("# ") {
            Some(kept) if !kept.starts_with('#') => {
                switched_on.push_str(kept);
                switched_on.push('\n');
            }
            _ => {}
        }
    }
    let (cert, key) = world.pki.participant_paths(Role::Broker, "broker");
    for (from, to) in [
        (
            "listen = \"0.0.0.0:8444\"".to_owned(),
            format!("listen = \"127.0.0.1:{port}\""),
        ),
        (
            "public_url = \"https://preview.example.de\"".to_owned(),
            format!("public_url = \"https://127.0.0.1:{port}\""),
        ),
        (
            "cert = \"preview.pem\"".to_owned(),
            format!("cert = {:?}", cert.display().to_string()),
        ),
        (
            "key = \"preview.key\"".to_owned(),
            format!("key = {:?}", key.display().to_string()),
        ),
    ] {
        assert!(switched_on.contains(&from), "the sample holds {from}");
        switched_on = switched_on.replace(&from, &to);
    }
    std::fs::write(config, switched_on).expect("config");
    let mapping = config.with_file_name("mapping.toml");
    let text = std::fs::read_to_string(&mapping).expect("mapping");
    assert!(text.contains("preview = false"));
    std::fs::write(&mapping, text.replace("preview = false", "preview = true")).expect("mapping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_binary_offers_the_preview_from_the_sample_section() {
    let world = World::start().await;
    admit_bridge(&world);
    let dir = tempfile::tempdir().expect("dir");
    let point = Arc::new(AccessPoint::default());
    let endpoint = serve(point.clone()).await;
    let config = configure(&world, dir.path(), &endpoint);
    // A mapping asking for the preview, and no [preview]: refused.
    let mapping = config.with_file_name("mapping.toml");
    let text = std::fs::read_to_string(&mapping).expect("mapping");
    std::fs::write(&mapping, text.replace("preview = false", "preview = true")).expect("mapping");
    let refused = unit(dir.path(), "ExecStartPre").output().expect("runs");
    assert_eq!(refused.status.code(), Some(1));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("mapping.toml") && said.contains("[preview]") && said.contains("evidence[0]"),
        "{said}"
    );
    std::fs::write(&mapping, text).expect("mapping");

    let port = onceonly_integration_tests::free_port().expect("port");
    with_preview(&world, &config, port);
    let mut bridge = serve_first_request(&point, dir.path()).await;
    let answer = document(&submitted(&point)[0]);
    assert_eq!(error_of(&answer).0, "EDM:ERR:0002", "{answer}");
    let location = preview_location(&answer);
    let prefix = format!("https://127.0.0.1:{port}");
    let path = location.strip_prefix(&prefix).expect("on the preview site");
    let addr = format!("127.0.0.1:{port}").parse().expect("addr");
    let (status, headers, body) = https_get(addr, &world.pki.ca_cert_path(), path).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("Anmeldecode"),
        "the sign-in, in German: {body}"
    );
    assert!(
        headers
            .iter()
            .any(|(n, v)| n == "content-security-policy" && v.contains("default-src 'none'")),
        "{headers:?}"
    );
    let (status, _, _) = https_get(addr, &world.pki.ca_cert_path(), "/preview/guessed").await;
    assert_eq!(status, 404);

    stops_on_sigterm(&mut bridge).await;
}
