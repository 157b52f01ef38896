//! Wall-clock time as every crate of the broker uses it: Unix milliseconds
//! (records, consents, heads) and protobuf timestamps on the wire. One
//! module, so the audit log, the exchange path and the consent store agree
//! on the conversions (and none imports another for a clock).

/// Unix milliseconds, now.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// Unix seconds, now.
pub fn unix_now() -> i64 {
    now_ms() / 1000
}

/// A protobuf timestamp from Unix milliseconds.
pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// Unix milliseconds from a protobuf timestamp.
pub fn millis(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(ts.nanos / 1_000_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_survive_a_timestamp_both_sides_of_the_epoch() {
        for ms in [0, 1, 999, 1_000, 1_795_000_000_123, -1, -1_001] {
            assert_eq!(millis(&timestamp(ms)), ms, "{ms}");
        }
        assert!(timestamp(-1).nanos >= 0, "nanos are never negative");
    }
}
