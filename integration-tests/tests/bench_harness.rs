//! The benchmark harness runs end to end (briefly, in the test profile):
//! its table has every scenario (PostgreSQL's where a server can run), the
//! ratios and the handshake rows, and
//! its JSON parses. The figures themselves are not judged here.

#[test]
fn onceonly_bench_prints_every_row_and_writes_json() {
    let dir = tempfile::tempdir().expect("dir");
    let json = dir.path().join("bench.json");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_onceonly-bench"))
        .args(["--concurrency", "1,4", "--seconds", "0.3", "--json"])
        .arg(&json)
        .output()
        .expect("bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for row in [
        "| direct: client -> connector | 1 |",
        "| brokered, audit durable | 4 |",
        "| brokered, audit not flushed | 4 |",
        "| brokered, audit durable, encrypted to the requester | 4 |",
        "c=4: encrypted / clear (both signed) brokered throughput",
        "| brokered, audit durable, unsigned requests | 4 |",
        "c=4: signed / unsigned requests brokered throughput",
        "| raw flush (512-byte append + fdatasync) | 1 |",
        "c=4: brokered-durable / direct throughput",
        "| bridged: EDM XML in and out, through the broker, encrypted to the bridge | 4 |",
        "c=4: bridged (EDM XML) / brokered-encrypted gRPC throughput",
        "| full handshakes |",
        "| with session resumption |",
    ] {
        assert!(stdout.contains(row), "missing {row:?} in\n{stdout}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parses");
    let rows = report["rows"].as_array().expect("rows");
    // HAProxy's row where it can run here, or the reason it was skipped.
    let proxied = stdout.contains("| proxied: HAProxy, no checks | 4 |");
    assert!(
        proxied || stdout.contains("skipped: proxied: HAProxy:"),
        "neither the HAProxy row nor why it was skipped:\n{stdout}"
    );
    if proxied {
        assert!(stdout.contains("c=4: brokered-durable / HAProxy throughput"));
    }
    // The PostgreSQL rows where a server can run here (`.ci/run` installs
    // one), or the reason they were skipped.
    let replicated = stdout.contains("| brokered on PostgreSQL, 2 replicas | 4 |");
    assert!(
        replicated || stdout.contains("skipped: brokered on PostgreSQL:"),
        "neither the PostgreSQL rows nor why they were skipped:\n{stdout}"
    );
    if replicated {
        assert!(stdout.contains("| brokered on PostgreSQL, 1 replica | 1 |"));
        assert!(stdout.contains("c=4: 2 replicas / 1 replica on PostgreSQL throughput"));
    }
    // The generic connector's rows: SQLite always, PostgreSQL where it runs.
    assert!(stdout.contains("| brokered via onceonly-connector, SQLite | 4 |"));
    assert!(stdout.contains(
        "c=4: brokered via onceonly-connector, SQLite / registry-mock brokered throughput"
    ));
    let generic_pg = stdout.contains("| brokered via onceonly-connector, PostgreSQL | 4 |");
    assert!(
        generic_pg || stdout.contains("skipped: brokered via onceonly-connector, PostgreSQL:"),
        "neither the generic PostgreSQL rows nor why they were skipped:\n{stdout}"
    );
    let expected = 15
        + if proxied { 2 } else { 0 }
        + if replicated { 4 } else { 0 }
        + if generic_pg { 2 } else { 0 };
    assert_eq!(
        rows.len(),
        expected,
        "the scenarios at two levels and the flush"
    );
    assert!(rows.iter().all(|r| r["errors"] == 0), "{rows:#?}");
    assert!(
        rows.iter().all(|r| r["requests"].as_u64().unwrap_or(0) > 0),
        "{rows:#?}"
    );
}
