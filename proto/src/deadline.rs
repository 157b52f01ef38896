//! One deadline model for every hop: the authority's call to the broker,
//! the broker's forward to a connector, and the connector's work.
//!
//! A call's [`Deadline`] is the caller's `grpc-timeout`, measured from when
//! the call arrived and capped by the server's own maximum. Before a server
//! starts work that must finish in time it keeps back a [`Reserve`] for what
//! still has to happen after the work (the broker: its audit write and its
//! answer; a connector: its answer's trip back), so that the server's own
//! `DEADLINE_EXCEEDED` reaches the caller before the caller's timer fires.
//! What remains is [`Deadline::keep_back`]'s work deadline, and the deadline
//! forwarded to the next hop ([`Deadline::apply`]).
//!
//! The reserve is sized from latency the server measured ([`LatencyWindow`]:
//! the slowest of the last seconds), with a share of the caller's timeout
//! as a floor against scheduling jitter; a deadline too short to leave any
//! time for the work after the reserve is refused at once.
//!
//! tonic's own timers end a call with `CANCELLED "Timeout expired"`;
//! [`deadline_aware`] turns that into the `DEADLINE_EXCEEDED` it means.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use crate::metadata::grpc_timeout;
use crate::status::error;
use crate::v1::ErrorReason;

/// The least time a hop must have for its own work after its reserve;
/// a deadline shorter than reserve + this is refused at once.
pub const MIN_WORK: Duration = Duration::from_millis(10);

/// The share of a caller's timeout kept back at least (1/5), against
/// scheduling jitter the measurements have not seen yet: on two busy cores
/// a wake-up, an fsync queued behind another and the answer's trip back
/// took more than a tenth of a 300 ms deadline in CI ...
const JITTER_SHARE: u32 = 5;
/// ... but never more than this.
const JITTER_FLOOR_MAX: Duration = Duration::from_millis(200);
/// The measured part of a reserve is at most this share of the timeout
/// (1/4): one slow flush must not make every shorter deadline fail; it
/// only shortens the work's share for a while.
const MEASURED_SHARE: u32 = 4;

/// When a call must be answered by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    at: Instant,
    /// The whole time the caller gave (after the cap), for messages and for
    /// sizing the jitter floor.
    total: Duration,
}

impl Deadline {
    /// The deadline of a call that arrived at `received` with `metadata`:
    /// its `grpc-timeout`, capped by `cap` (also the deadline of a call that
    /// brings none).
    pub fn of_call(metadata: &MetadataMap, received: Instant, cap: Duration) -> Deadline {
        let total = grpc_timeout(metadata).map_or(cap, |timeout| timeout.min(cap));
        Deadline {
            at: received + total,
            total,
        }
    }

    /// A deadline `total` after `start`.
    pub fn after(start: Instant, total: Duration) -> Deadline {
        Deadline {
            at: start + total,
            total,
        }
    }

    /// The instant itself.
    pub fn instant(&self) -> Instant {
        self.at
    }

    /// The whole time the caller gave.
    pub fn total(&self) -> Duration {
        self.total
    }

    /// The time left from now (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Whether it has passed.
    pub fn has_passed(&self) -> bool {
        self.remaining().is_zero()
    }

    /// This deadline, or `limit` from now where that is earlier (a
    /// per-connector timeout).
    pub fn at_most(&self, limit: Duration) -> Deadline {
        let capped = Instant::now() + limit;
        if capped < self.at {
            Deadline {
                at: capped,
                total: limit,
            }
        } else {
            *self
        }
    }

    /// The deadline for the work: this one less `reserve`, which is kept for
    /// what must still happen after the work. Err with the shortest total
    /// timeout that could work where less than `min_work` (at least
    /// [`MIN_WORK`]) would remain.
    pub fn keep_back(&self, reserve: Duration, min_work: Duration) -> Result<Deadline, TooShort> {
        let needed = reserve + min_work.max(MIN_WORK);
        if self.total < needed {
            return Err(TooShort {
                given: self.total,
                needed,
            });
        }
        Ok(Deadline {
            at: self.at - reserve,
            total: self.total - reserve,
        })
    }

    /// Sets an outgoing call's `grpc-timeout` to the time left, so the next
    /// hop works to the same deadline.
    pub fn apply<T>(&self, request: &mut tonic::Request<T>) {
        request.set_timeout(self.remaining());
    }

    /// Runs `work` until this deadline; `Err` where it passed first (the
    /// work is dropped, which cancels it).
    pub async fn run<F: std::future::Future>(
        &self,
        work: F,
    ) -> Result<F::Output, tokio::time::error::Elapsed> {
        tokio::time::timeout_at(self.at.into(), work).await
    }
}

/// A caller's deadline too short for the hop to do anything in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the deadline of {given:?} is too short: this hop needs at least {needed:?} to do its work and still answer in time; give the call a longer deadline"
)]
pub struct TooShort {
    /// The timeout the caller gave.
    pub given: Duration,
    /// The shortest that could work now.
    pub needed: Duration,
}

impl TooShort {
    /// DEADLINE_EXCEEDED (DEADLINE_TOO_SHORT), the status this refusal gets.
    pub fn status(&self) -> Status {
        error(
            Code::DeadlineExceeded,
            ErrorReason::DeadlineTooShort,
            self.to_string(),
        )
    }
}

/// What a hop keeps back for the steps after its work: `fixed` plus a
/// multiple of the latency it measured for those steps, and at least a
/// share of the caller's timeout (jitter the measurements have not seen).
#[derive(Debug, Clone, Copy)]
pub struct Reserve {
    /// Always kept: the answer's trip back.
    pub fixed: Duration,
    /// How many times the measured latency to keep.
    pub factor: u32,
}

impl Reserve {
    /// The reserve for a call of `total` given `measured` (e.g.
    /// [`LatencyWindow::recent_max`]). The measured part is capped at a
    /// quarter of `total`, so a slow spell shortens the work's share rather
    /// than refusing deadlines.
    pub fn for_call(&self, total: Duration, measured: Duration) -> Duration {
        let measured_part = (measured * self.factor).min(total / MEASURED_SHARE);
        let jitter_floor = (total / JITTER_SHARE).min(JITTER_FLOOR_MAX);
        (self.fixed + measured_part).max(jitter_floor)
    }
}

/// The slowest latency seen in the last few seconds, lock-free: one slot a
/// second, each holding (second, slowest microseconds). Where the window
/// holds no sample (after a quiet spell, or before the first), the last
/// sample ever taken stands in, or the one the window was seeded with: a
/// reserve is always sized from a measurement.
#[derive(Debug)]
pub struct LatencyWindow {
    slots: [AtomicU64; SLOTS],
    /// The last sample, microseconds.
    last: AtomicU64,
    epoch: Instant,
}

const SLOTS: usize = 8;
/// Seconds a sample counts.
const WINDOW_SECS: u64 = (SLOTS as u64) - 1;

impl Default for LatencyWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyWindow {
    /// An empty window.
    pub fn new() -> Self {
        LatencyWindow {
            slots: Default::default(),
            last: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// A window that, until its first sample, reports `measured` (e.g. an
    /// fsync timed at start).
    pub fn seeded(measured: Duration) -> Self {
        let window = Self::new();
        window.last.store(micros_of(measured), Ordering::Relaxed);
        window
    }

    fn now_secs(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    /// Counts one measurement.
    pub fn record(&self, latency: Duration) {
        let second = self.now_secs();
        let micros = micros_of(latency);
        self.last.store(micros, Ordering::Relaxed);
        let slot = &self.slots[(second % SLOTS as u64) as usize];
        let mut current = slot.load(Ordering::Relaxed);
        loop {
            let (slot_second, slot_max) = (current >> 32, current & 0xffff_ffff);
            // A writer delayed past a newer second leaves that second's slot.
            if slot_second > second || (slot_second == second && micros <= slot_max) {
                return;
            }
            // A slot from an older second is overwritten, not maxed.
            let updated = (second << 32) | micros;
            match slot.compare_exchange_weak(current, updated, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }

    /// The slowest measurement of the last seconds; where there is none,
    /// the last one ever (or the seed; zero if never measured).
    pub fn recent_max(&self) -> Duration {
        let now = self.now_secs();
        let micros = self
            .slots
            .iter()
            .map(|slot| slot.load(Ordering::Relaxed))
            .filter(|packed| {
                let second = packed >> 32;
                *packed != 0 && second <= now && now - second <= WINDOW_SECS
            })
            .map(|packed| packed & 0xffff_ffff)
            .max()
            .unwrap_or_else(|| self.last.load(Ordering::Relaxed));
        Duration::from_micros(micros)
    }
}

fn micros_of(latency: Duration) -> u64 {
    u64::try_from(latency.as_micros())
        .unwrap_or(u64::MAX)
        .min(u64::from(u32::MAX))
}

/// Whether `status` is tonic's own timer expiring (which tonic reports as
/// `CANCELLED "Timeout expired"`).
pub fn is_timer_expiry(status: &Status) -> bool {
    status.code() == Code::Cancelled && status.message() == tonic::TimeoutExpired(()).to_string()
}

/// `status`, with tonic's timer expiry turned into the DEADLINE_EXCEEDED
/// it means; any other status unchanged.
pub fn deadline_aware(status: Status) -> Status {
    if is_timer_expiry(&status) {
        error(
            Code::DeadlineExceeded,
            ErrorReason::DeadlineExceeded,
            "the deadline passed before the answer arrived",
        )
    } else {
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn call(timeout: &'static str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", MetadataValue::from_static(timeout));
        metadata
    }

    #[test]
    fn a_call_deadline_is_the_callers_timeout_capped() {
        let now = Instant::now();
        let cap = Duration::from_secs(30);
        assert_eq!(
            Deadline::of_call(&call("300m"), now, cap).instant(),
            now + Duration::from_millis(300)
        );
        assert_eq!(Deadline::of_call(&call("1H"), now, cap).total(), cap);
        assert_eq!(
            Deadline::of_call(&MetadataMap::new(), now, cap).total(),
            cap
        );
    }

    #[test]
    fn keeping_back_a_reserve_leaves_the_work_deadline_or_refuses() {
        let now = Instant::now();
        let deadline = Deadline::after(now, Duration::from_millis(300));
        let work = deadline
            .keep_back(Duration::from_millis(30), MIN_WORK)
            .expect("fits");
        assert_eq!(work.instant(), now + Duration::from_millis(270));
        let too_short = Deadline::after(now, Duration::from_millis(35))
            .keep_back(Duration::from_millis(30), MIN_WORK)
            .expect_err("no time left for work");
        assert_eq!(too_short.needed, Duration::from_millis(30) + MIN_WORK);
        let status = too_short.status();
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert_eq!(
            crate::status::reason_of(&status),
            Some(ErrorReason::DeadlineTooShort)
        );
    }

    #[test]
    fn the_reserve_follows_measurements_with_a_jitter_floor() {
        let reserve = Reserve {
            fixed: Duration::from_millis(5),
            factor: 3,
        };
        // Fast appends: the floor (a fifth of the timeout) rules.
        assert_eq!(
            reserve.for_call(Duration::from_millis(300), Duration::from_millis(1)),
            Duration::from_millis(60)
        );
        // Slow appends: the measurement rules.
        assert_eq!(
            reserve.for_call(Duration::from_millis(300), Duration::from_millis(20)),
            Duration::from_millis(65)
        );
        // A very slow spell takes at most a quarter of the timeout, so the
        // deadline still leaves room for work.
        let spell = reserve.for_call(Duration::from_millis(300), Duration::from_millis(200));
        assert_eq!(spell, Duration::from_millis(80));
        assert!(
            Deadline::after(Instant::now(), Duration::from_millis(300))
                .keep_back(spell, MIN_WORK)
                .is_ok()
        );
        // Long timeouts keep at most 200 ms for jitter.
        assert_eq!(
            reserve.for_call(Duration::from_secs(60), Duration::ZERO),
            Duration::from_millis(200)
        );
    }

    #[test]
    fn the_latency_window_keeps_the_slowest_recent_sample() {
        let window = LatencyWindow::new();
        assert_eq!(window.recent_max(), Duration::ZERO);
        window.record(Duration::from_micros(400));
        window.record(Duration::from_micros(1_500));
        window.record(Duration::from_micros(900));
        assert_eq!(window.recent_max(), Duration::from_micros(1_500));
    }

    #[test]
    fn an_empty_window_reports_its_seed_until_the_first_sample() {
        let window = LatencyWindow::seeded(Duration::from_micros(2_000));
        assert_eq!(window.recent_max(), Duration::from_micros(2_000));
        window.record(Duration::from_micros(300));
        assert_eq!(window.recent_max(), Duration::from_micros(300));
    }

    #[test]
    fn tonic_timer_expiry_becomes_deadline_exceeded() {
        let expired = Status::cancelled(tonic::TimeoutExpired(()).to_string());
        assert!(is_timer_expiry(&expired));
        let mapped = deadline_aware(expired);
        assert_eq!(mapped.code(), Code::DeadlineExceeded);
        let other = deadline_aware(Status::cancelled("the client went away"));
        assert_eq!(other.code(), Code::Cancelled);
    }
}
