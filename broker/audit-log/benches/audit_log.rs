//! What the audit log costs, measured side by side in one run:
//!
//! 1. the raw cost of one fsync of a small append on this disk (the floor);
//! 2. durable appends per second through the log (group commit) with 1, 16
//!    and 256 concurrent writers, against a baseline that flushes once per
//!    record (no group commit) with the same writers;
//! 3. query latency by subject (indexed) in a log of `--records` records
//!    (default 1,000,000).
//!
//! `cargo bench -p onceonly-audit-log --bench audit_log [-- --records N --seconds S]`
//! Figures only; nothing here passes or fails.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use onceonly_audit_log::{AuditFilter, AuditLog};
use onceonly_proto::v1::{AuditRecord, ExchangeOutcome};
use ring::signature::Ed25519KeyPair;

fn key() -> Ed25519KeyPair {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("key");
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key")
}

/// A realistic record: the fields the broker fills, with a 32-byte
/// pseudonym and digest.
fn record(n: u64, subjects: u64) -> AuditRecord {
    AuditRecord {
        exchange_id: format!("ex-{n:024x}"),
        request_id: format!("req-{n}"),
        received_at: Some(prost_types::Timestamp {
            seconds: 1_795_000_000 + (n / 1000) as i64,
            nanos: 0,
        }),
        caller_id: format!("spiffe://onceonly.test/authority/office-{}", n % 50),
        evidence_type: [
            "birth-certificate",
            "proof-of-residence",
            "vehicle-registration",
        ][(n % 3) as usize]
            .into(),
        purpose: "parental-allowance".into(),
        legal_basis: "§ 9 Abs. 1 BEEG".into(),
        subject_scheme: 1,
        subject_pseudonym: subject(n % subjects),
        connector_id: "civil-register".into(),
        outcome: ExchangeOutcome::Delivered as i32,
        payload_sha256: vec![(n % 251) as u8; 32],
        latency_micros: 1200,
        ..Default::default()
    }
}

fn subject(s: u64) -> Vec<u8> {
    let mut p = [0u8; 32];
    p[..8].copy_from_slice(&s.to_be_bytes());
    p.to_vec()
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn raw_fsync(dir: &std::path::Path) -> Duration {
    let mut file = std::fs::File::create(dir.join("fsync-probe")).expect("file");
    let rounds = 200;
    let started = Instant::now();
    for _ in 0..rounds {
        file.write_all(&[0u8; 256]).expect("write");
        file.sync_data().expect("fdatasync");
    }
    started.elapsed() / rounds
}

/// Appends per second through the log with `writers` concurrent appenders.
async fn group_commit(writers: usize, seconds: u64) -> f64 {
    let dir = tempfile::tempdir().expect("dir");
    let db = sled::open(dir.path()).expect("db");
    let (log, _writer) = AuditLog::open(dir.path(), &db, true, key()).expect("log");
    let done = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let log = log.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = w as u64;
            while Instant::now() < stop {
                log.append(record(n, 10_000)).await.expect("append");
                done.fetch_add(1, Ordering::Relaxed);
                n += writers as u64;
            }
        }));
    }
    let started = Instant::now();
    for task in tasks {
        task.await.expect("task");
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// The baseline: each record appended to a file and flushed on its own
/// (what a log without group commit does), with `writers` concurrent
/// appenders taking turns.
async fn flush_per_record(writers: usize, seconds: u64) -> f64 {
    use prost::Message;
    let dir = tempfile::tempdir().expect("dir");
    let file = Arc::new(std::sync::Mutex::new(
        std::fs::File::create(dir.path().join("baseline.log")).expect("file"),
    ));
    let next = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (file, next) = (file.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let file = file.clone();
                tokio::task::spawn_blocking(move || {
                    let mut file = file.lock().expect("lock");
                    file.write_all(&record(n, 10_000).encode_to_vec())
                        .expect("write");
                    file.sync_data().expect("fdatasync");
                })
                .await
                .expect("blocking");
            }
        }));
    }
    let started = Instant::now();
    for task in tasks {
        task.await.expect("task");
    }
    next.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn query_latency(records: u64) {
    let subjects = (records / 100).max(1);
    let dir = tempfile::tempdir().expect("dir");
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(64 * 1024 * 1024)
        .open()
        .expect("db");
    // Filling is not what is measured: flushing only at the end.
    let (log, _writer) = AuditLog::open(dir.path(), &db, false, key()).expect("log");
    let started = Instant::now();
    let mut pending = Vec::new();
    for n in 0..records {
        let log = log.clone();
        pending.push(tokio::spawn(async move {
            log.append(record(n, subjects)).await
        }));
        if pending.len() == 8192 {
            for task in pending.drain(..) {
                task.await.expect("task").expect("append");
            }
        }
    }
    for task in pending {
        task.await.expect("task").expect("append");
    }
    db.flush_async().await.expect("flush");
    println!(
        "  filled {records} records ({subjects} subjects, ~100 records each) in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut latencies = Vec::new();
    for q in 0..500u64 {
        let filter = AuditFilter {
            subject_pseudonym: Some(subject((q * 7919) % subjects)),
            ..Default::default()
        };
        let started = Instant::now();
        let (found, _) = log.query(&filter, 0, 100).expect("query");
        latencies.push(started.elapsed());
        assert!(!found.is_empty());
    }
    latencies.sort();
    println!(
        "  query by subject (first page, up to 100 records), 500 queries: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
    );
}

#[tokio::main]
async fn main() {
    let records = arg("--records", 1_000_000);
    let seconds = arg("--seconds", 3);
    let probe = tempfile::tempdir().expect("dir");
    let fsync = raw_fsync(probe.path());
    println!(
        "# audit log benchmark ({} cores)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "\nraw fdatasync of a 256-byte append: {:.3} ms (at most {:.0} flushes/s)",
        fsync.as_secs_f64() * 1e3,
        1.0 / fsync.as_secs_f64()
    );
    println!("\ndurable appends per second ({seconds} s each):\n");
    println!("| writers | group commit (the log) | one flush per record | ratio |");
    println!("| ---: | ---: | ---: | ---: |");
    for writers in [1usize, 16, 256] {
        let grouped = group_commit(writers, seconds).await;
        let baseline = flush_per_record(writers, seconds).await;
        println!(
            "| {writers} | {grouped:.0} | {baseline:.0} | {:.1}x |",
            grouped / baseline
        );
    }
    println!("\nquery latency by subject at {records} records:");
    query_latency(records).await;
}
