//! A real headless Chromium for the console's tests, driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`, with fantoccini), holding a
//! person's client certificate the way a browser at a desk does: in its
//! NSS database, filled with `pk12util`, and picked without a prompt under
//! the `AutoSelectCertificateForUrls` policy. The trust domain's CA is
//! trusted in the same database, so the console's certificate is checked
//! for real, not waved through.
//!
//! Each [`Browser`] has a home directory (its NSS database) and profile of
//! its own; chromedriver and Chromium stop when it is dropped.
//! [`Browser::axe`] runs axe-core (npm package `axe-core`, installed by
//! `.ci/run` into `target/npm`) in the page; [`Browser::screenshot`] saves
//! the page as a test artefact under `target/console-screenshots`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use onceonly_certs::Pki;
use onceonly_certs::identity::Role;

/// Where Chromium reads machine-wide policies; the client-certificate
/// choice is one.
const POLICY_FILE: &str = "/etc/chromium/policies/managed/onceonly-console-tests.json";

/// A headless Chromium with, or without, a person's certificate.
pub struct Browser {
    /// The WebDriver session (taken by [`Browser::close`]).
    client: Option<fantoccini::Client>,
    driver: Child,
    _home: tempfile::TempDir,
}

/// The workspace's `target/` directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Whether Chromium and its driver are installed. Where they are not, the
/// browser tests fail under CI (`.ci/run` installs them) and are skipped
/// elsewhere, saying so.
pub fn available() -> bool {
    let present = [
        "chromium",
        "chromedriver",
        "certutil",
        "pk12util",
        "openssl",
    ]
    .iter()
    .all(|tool| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !present {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium, chromium-driver, libnss3-tools and openssl are needed for the browser tests; .ci/run installs them"
        );
        eprintln!(
            "skipped: chromium, chromedriver, certutil, pk12util or openssl is not installed"
        );
    }
    present
}

/// Makes Chromium pick a client certificate without a prompt: on
/// loopback only, and only one the test CA issued. Written once per
/// machine; the file names the tests.
fn allow_certificate_auto_selection() {
    let policy = r#"{"AutoSelectCertificateForUrls": ["{\"pattern\":\"https://127.0.0.1:*\",\"filter\":{\"ISSUER\":{\"CN\":\"onceonly root CA onceonly.test\"}}}"]}"#;
    if std::fs::read_to_string(POLICY_FILE).is_ok_and(|p| p == policy) {
        return;
    }
    let dir = Path::new(POLICY_FILE).parent().expect("a folder");
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(POLICY_FILE, policy))
        .unwrap_or_else(|e| {
            panic!("cannot write Chromium's policy {POLICY_FILE} (run the browser tests as root, as .ci/run does): {e}")
        });
}

impl Browser {
    /// A browser trusting `pki`'s CA and holding the certificate of `who`
    /// (role, id) where given.
    pub async fn start(pki: &Pki, who: Option<(Role, &str)>) -> Browser {
        allow_certificate_auto_selection();
        let home = tempfile::Builder::new()
            .prefix("onceonly-browser-")
            .tempdir()
            .expect("temp dir");
        let nssdb = home.path().join(".pki/nssdb");
        std::fs::create_dir_all(&nssdb).expect("nssdb folder");
        let db = format!("sql:{}", nssdb.display());
        run(Command::new("certutil").args(["-N", "--empty-password", "-d", &db]));
        run(Command::new("certutil")
            .args(["-A", "-d", &db, "-n", "onceonly-test-ca", "-t", "C,,", "-i"])
            .arg(pki.ca_cert_path()));
        if let Some((role, id)) = who {
            let (cert, key) = pki.participant_paths(role, id);
            let p12 = home.path().join("person.p12");
            run(Command::new("openssl")
                .args(["pkcs12", "-export", "-passout", "pass:", "-inkey"])
                .arg(&key)
                .arg("-in")
                .arg(&cert)
                .arg("-out")
                .arg(&p12));
            run(Command::new("pk12util")
                .args(["-d", &db, "-W", "", "-i"])
                .arg(&p12));
        }
        let port = crate::free_port().expect("a free port");
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            // Its own process group, so that Chromium goes with it.
            .process_group(0)
            .env("HOME", home.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = home.path().join("profile");
        let capabilities = serde_json::json!({
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,1000",
                    "--lang=en-GB",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }
        });
        let capabilities = match capabilities {
            serde_json::Value::Object(map) => map,
            _ => unreachable!("an object"),
        };
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match fantoccini::ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                Err(error) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "no WebDriver session from chromedriver at {url}: {error}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        Browser {
            client: Some(client),
            driver,
            _home: home,
        }
    }

    /// The WebDriver session.
    pub fn client(&self) -> &fantoccini::Client {
        self.client.as_ref().expect("a session until closed")
    }

    /// Opens `url` and returns the page's text.
    pub async fn open(&self, url: &str) -> String {
        self.client().goto(url).await.expect("the page opens");
        self.text().await
    }

    /// The page's visible text (read again where the page was replaced
    /// while reading).
    pub async fn text(&self) -> String {
        let mut tries = 0;
        loop {
            let body = self
                .client()
                .wait()
                .at_most(Duration::from_secs(10))
                .for_element(fantoccini::Locator::Css("body"))
                .await
                .expect("a body");
            match body.text().await {
                Ok(text) => return text,
                Err(error) => {
                    tries += 1;
                    assert!(tries < 20, "the page's text cannot be read: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// The value of the field `css` names.
    pub async fn value_of(&self, css: &str) -> String {
        self.client()
            .find(fantoccini::Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
            .attr("value")
            .await
            .expect("read")
            .unwrap_or_default()
    }

    /// Opens `page` (HTML) as served by another origin (a server on
    /// another loopback port: the attacker's site), and waits until the
    /// browser has left it for a page starting with `leads_to`; that
    /// page's text.
    pub async fn visit_foreign_page(&self, page: String, leads_to: &str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let foreign = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let app = axum::Router::new().route(
                "/",
                axum::routing::get(move || {
                    let page = page.clone();
                    async move { axum::response::Html(page) }
                }),
            );
            let _ = axum::serve(listener, app).await;
        });
        self.client()
            .goto(&format!("http://{foreign}/"))
            .await
            .expect("opens");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let at = self.client().current_url().await.expect("url");
            if at.as_str().starts_with(leads_to) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the foreign page did not lead to {leads_to}: at {at}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server.abort();
        self.text().await
    }

    /// Types `text` into the field `css` names.
    pub async fn type_into(&self, css: &str, text: &str) {
        self.client()
            .find(fantoccini::Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
            .send_keys(text)
            .await
            .expect("typed");
    }

    /// Clicks `button` (a submit), waits for the page that has `expect`,
    /// and returns its text.
    pub async fn submit(&self, button: &str, expect: &str) -> String {
        self.client()
            .find(fantoccini::Locator::Css(button))
            .await
            .unwrap_or_else(|e| panic!("no {button} on the page: {e}"))
            .click()
            .await
            .expect("clicked");
        self.client()
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(fantoccini::Locator::Css(expect))
            .await
            .unwrap_or_else(|e| panic!("no {expect} after clicking {button}: {e}"));
        self.text().await
    }

    /// Runs axe-core's WCAG 2.1 A and AA rules in the page; returns the
    /// violations (id, impact, nodes).
    pub async fn axe(&self) -> Vec<(String, String, u64)> {
        let path = target_dir().join("npm/node_modules/axe-core/axe.min.js");
        let source = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "axe-core is not at {} (.ci/run installs it: npm install --prefix target/npm axe-core): {e}",
                path.display()
            )
        });
        self.client()
            .execute(&source, vec![])
            .await
            .expect("axe-core loads in the page");
        let found = self
            .client()
            .execute_async(
                r#"const done = arguments[arguments.length - 1];
                axe.run(document, { runOnly: { type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"] } })
                    .then(r => done(r.violations.map(v => [v.id, v.impact || "", v.nodes.length])))
                    .catch(e => done([["axe-error", String(e), 0]]));"#,
                vec![],
            )
            .await
            .expect("axe-core runs");
        serde_json::from_value(found).expect("violations as [id, impact, nodes]")
    }

    /// Asserts that axe-core finds no serious or critical violation in
    /// the page (`page` names it in the failure).
    pub async fn assert_accessible(&self, page: &str) {
        let violations = self.axe().await;
        let grave: Vec<_> = violations
            .iter()
            .filter(|(_, impact, _)| {
                impact == "serious" || impact == "critical" || impact.contains("Error")
            })
            .collect();
        assert!(
            grave.is_empty(),
            "axe-core found serious or critical WCAG 2.1 AA violations on {page}: {grave:?}"
        );
    }

    /// Saves the page as `target/console-screenshots/<name>.png`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client().screenshot().await.expect("a screenshot");
        let dir = target_dir().join("console-screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot folder");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("screenshot written");
        path
    }

    /// Ends the session (Chromium quits), then the driver.
    pub async fn close(mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.close().await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The driver's whole process group: Chromium too, where a failed
        // test never ended the session.
        let _ = Command::new("kill")
            .args(["-KILL", "--"])
            .arg(format!("-{}", self.driver.id()))
            .status();
        let _ = self.driver.wait();
    }
}
