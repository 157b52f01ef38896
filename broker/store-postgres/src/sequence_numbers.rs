//! Per-replica sequence numbers on queued audit records (issue 23).
//!
//! The receipt watch of a replica notices a record of its own that never
//! reaches the log, but only while that replica runs. The numbers close
//! the rest:
//!
//! - **Writing.** A replica numbers the records it queues 1, 2, 3, ...
//!   within a *segment*, and the row's tag covers replica, segment, number
//!   and record. Its queue commits run one at a time, so a number is
//!   visible only once every lower number of its segment is. After a
//!   commit whose outcome it cannot know (a timeout, a cut connection) the
//!   replica starts the next segment: the uncertain batch may or may not
//!   be there, and no later number depends on it. (It was not receipted,
//!   so nobody holds a promise about it.) Each row of the new segment
//!   names the last number committed before it (`chain`: the segment and
//!   number, under the tag), so failed commits an intruder provokes do not
//!   turn the rows before them into an unchecked tail. A process's first segment is
//!   a random number, so two processes that happen to share a name do not
//!   share numbers.
//! - **Sequencing.** The sequencer keeps, per replica and segment, the last
//!   number it took (a tagged *mark*). A number at or below the mark, or
//!   seen twice, is a copied row: set aside. A number above the mark + 1 is
//!   a gap: rows deleted before they were sequenced, recorded and reported
//!   however long ago their replica stopped; so is a segment's `chain`
//!   above the mark of the segment it names. The sequencer also holds the
//!   marks it wrote, and stops where a stored one is missing or lower (a
//!   mark rolled back to let a copy through).
//!
//! What numbers cannot show: the last rows a replica queued, deleted while
//! nothing of that replica follows (its own receipt watch covers those
//! while it runs; THREAT_MODEL.md names the rest under Open).

use std::collections::{HashMap, HashSet};

/// Where a replica's next queued record goes: its segment and number, and
/// the last number committed before this segment: (segment, number), or
/// (0, 0) for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueuePosition {
    pub segment: i64,
    pub next: i64,
    pub chain: (i64, i64),
}

impl QueuePosition {
    /// A process's first position: number 1 of a random segment (below
    /// 2^62, so it never runs out; 0 is left to rows queued before numbers
    /// existed).
    pub fn start() -> Self {
        let mut bytes = [0u8; 8];
        // No randomness: segment 1, as unique as the replica's name.
        let random = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_or(0, |()| u64::from_be_bytes(bytes) >> 2);
        QueuePosition::at(random as i64 + 1)
    }

    /// Number 1 of `segment`, the first of its process.
    pub fn at(segment: i64) -> Self {
        QueuePosition {
            segment,
            next: 1,
            chain: (0, 0),
        }
    }

    /// The numbers of a batch of `count` records from here.
    pub fn numbers(&self, count: usize) -> Vec<i64> {
        (self.next..).take(count).collect()
    }

    /// A batch of `count` records was committed.
    pub fn committed(&mut self, count: usize) {
        self.next += count as i64;
    }

    /// A commit failed, and may or may not have landed: go on in a new
    /// segment, so no later number leans on the uncertain ones.
    pub fn uncertain(&mut self) {
        // The numbers before the failed commit were committed: the next
        // segment names the last of them; where nothing was committed in
        // this one, it names what this one named.
        if self.next > 1 {
            self.chain = (self.segment, self.next - 1);
        }
        self.segment += 1;
        self.next = 1;
    }
}

const ROW_CONTEXT: &[u8] = b"onceonly-audit-queue-v2\0";
/// The tag of rows queued before numbers existed: the record's bytes only.
const LEGACY_ROW_CONTEXT: &[u8] = b"onceonly-audit-queue-v1\0";
const MARK_CONTEXT: &[u8] = b"onceonly-audit-queue-mark-v1\0";

/// The bytes a tag covers: the context, the replica's name (its length
/// first, so no two names and numbers share bytes), then `parts`.
fn tagged(context: &[u8], replica: &str, parts: &[&[u8]]) -> Vec<u8> {
    let mut message = Vec::with_capacity(64 + parts.iter().map(|p| p.len()).sum::<usize>());
    message.extend_from_slice(context);
    message.extend_from_slice(&(replica.len() as u64).to_be_bytes());
    message.extend_from_slice(replica.as_bytes());
    for part in parts {
        message.extend_from_slice(part);
    }
    message
}

fn row_message(replica: &str, numbers: Numbers, record: &[u8]) -> Vec<u8> {
    let (segment, seq, (chain_segment, chain_last)) = numbers;
    tagged(
        ROW_CONTEXT,
        replica,
        &[
            &segment.to_be_bytes(),
            &seq.to_be_bytes(),
            &chain_segment.to_be_bytes(),
            &chain_last.to_be_bytes(),
            record,
        ],
    )
}

/// A queued row's segment, number, and the last number committed before
/// its segment (segment, number).
pub(crate) type Numbers = (i64, i64, (i64, i64));

fn mark_message(replica: &str, segment: i64, last: i64) -> Vec<u8> {
    tagged(
        MARK_CONTEXT,
        replica,
        &[&segment.to_be_bytes(), &last.to_be_bytes()],
    )
}

/// The tag of a queued row: replica, segment, number and record.
pub(crate) fn row_tag(
    key: &ring::hmac::Key,
    replica: &str,
    position: Numbers,
    record: &[u8],
) -> Vec<u8> {
    ring::hmac::sign(key, &row_message(replica, position, record))
        .as_ref()
        .to_vec()
}

/// Whether a queued row was written by a replica. Number 0 is a row queued
/// before numbers existed (a rolling upgrade), under the old tag of its
/// bytes alone; only a replica could make either.
pub(crate) fn row_is_authentic(
    key: &ring::hmac::Key,
    replica: &str,
    position: Numbers,
    record: &[u8],
    found: &[u8],
) -> bool {
    if position.1 == 0 {
        return ring::hmac::verify(key, &[LEGACY_ROW_CONTEXT, record].concat(), found).is_ok();
    }
    ring::hmac::verify(key, &row_message(replica, position, record), found).is_ok()
}

/// The tag of a mark: the last number taken of a replica's segment.
pub(crate) fn mark_tag(key: &ring::hmac::Key, replica: &str, segment: i64, last: i64) -> Vec<u8> {
    ring::hmac::sign(key, &mark_message(replica, segment, last))
        .as_ref()
        .to_vec()
}

/// Whether a stored mark was written by a sequencer.
pub(crate) fn mark_is_authentic(
    key: &ring::hmac::Key,
    replica: &str,
    segment: i64,
    last: i64,
    found: &[u8],
) -> bool {
    ring::hmac::verify(key, &mark_message(replica, segment, last), found).is_ok()
}

/// An authentic queued row's place in its replica's numbering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Numbered {
    pub queue_id: i64,
    pub replica: String,
    pub segment: i64,
    pub seq: i64,
    /// The last number committed before this segment: (segment, number),
    /// (0, 0) for none.
    pub chain: (i64, i64),
}

/// Numbers missing from a replica's segment: rows deleted before they
/// were sequenced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Gap {
    pub replica: String,
    pub segment: i64,
    pub first: i64,
    pub last: i64,
}

impl Gap {
    /// How many records are missing.
    pub fn len(&self) -> u64 {
        (self.last - self.first + 1).max(0) as u64
    }
}

/// What the numbers of one sequencing run's rows show.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Checked {
    /// Rows whose number was taken already: copies, set aside.
    pub copies: HashSet<i64>,
    /// Numbers missing.
    pub gaps: Vec<Gap>,
    /// The new marks to store: (replica, segment) → last number taken.
    pub marks: HashMap<(String, i64), i64>,
}

/// Checks `rows` (authentic, numbered above 0, in any order) against the
/// `marks` stored so far (absent: nothing of that segment taken yet).
pub(crate) fn check(rows: &[Numbered], marks: &HashMap<(String, i64), i64>) -> Checked {
    let mut segments: HashMap<(String, i64), Vec<&Numbered>> = HashMap::new();
    for row in rows.iter().filter(|row| row.seq > 0) {
        segments
            .entry((row.replica.clone(), row.segment))
            .or_default()
            .push(row);
    }
    let mut checked = Checked::default();
    for (segment, mut rows) in segments {
        rows.sort_by_key(|row| (row.seq, row.queue_id));
        let taken = marks.get(&segment).copied().unwrap_or(0);
        let mut expected = taken + 1;
        for row in rows {
            if row.seq < expected {
                checked.copies.insert(row.queue_id);
                continue;
            }
            if row.seq > expected {
                checked.gaps.push(Gap {
                    replica: segment.0.clone(),
                    segment: segment.1,
                    first: expected,
                    last: row.seq - 1,
                });
            }
            expected = row.seq + 1;
        }
        if expected - 1 > taken {
            checked.marks.insert(segment, expected - 1);
        }
    }
    // A segment seen for the first time names the last number committed
    // before it: every number up to it must have been taken.
    let mut chained: Vec<((String, i64), i64)> = rows
        .iter()
        .filter(|row| {
            row.seq > 0
                && row.chain.1 > 0
                && !marks.contains_key(&(row.replica.clone(), row.segment))
        })
        .map(|row| ((row.replica.clone(), row.chain.0), row.chain.1))
        .collect();
    chained.sort();
    chained.dedup_by(|a, b| a.0 == b.0);
    for (before, after) in chained {
        let taken = checked
            .marks
            .get(&before)
            .or_else(|| marks.get(&before))
            .copied()
            .unwrap_or(0);
        if taken < after {
            checked.gaps.push(Gap {
                replica: before.0.clone(),
                segment: before.1,
                first: taken + 1,
                last: after,
            });
            checked.marks.insert(before, after);
        }
    }
    checked
        .gaps
        .sort_by(|a, b| (&a.replica, a.segment, a.first).cmp(&(&b.replica, b.segment, b.first)));
    checked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(queue_id: i64, replica: &str, segment: i64, seq: i64) -> Numbered {
        Numbered {
            queue_id,
            replica: replica.into(),
            segment,
            seq,
            chain: (0, 0),
        }
    }

    /// The first row of `segment`, which names `last` of `segment - 1`.
    fn first_of(queue_id: i64, replica: &str, segment: i64, last: i64) -> Numbered {
        Numbered {
            chain: (segment - 1, last),
            ..row(queue_id, replica, segment, 1)
        }
    }

    fn key() -> ring::hmac::Key {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"test key of the replicas")
    }

    #[test]
    fn an_unbroken_run_of_numbers_moves_the_mark_and_nothing_else() {
        let rows = [row(10, "a", 1, 1), row(11, "a", 1, 2), row(12, "b", 3, 1)];
        let checked = check(&rows, &HashMap::new());
        assert!(checked.copies.is_empty() && checked.gaps.is_empty());
        assert_eq!(checked.marks[&("a".into(), 1)], 2);
        assert_eq!(checked.marks[&("b".into(), 3)], 1);
        // The next run goes on from the marks.
        let next = check(&[row(13, "a", 1, 3)], &checked.marks);
        assert!(next.copies.is_empty() && next.gaps.is_empty());
        assert_eq!(next.marks[&("a".into(), 1)], 3);
    }

    #[test]
    fn a_deleted_row_is_a_gap_however_the_rows_arrive() {
        let marks = HashMap::from([(("a".to_string(), 1), 4)]);
        // 5 and 6 deleted; 8 deleted; the rest read out of order.
        let rows = [row(20, "a", 1, 9), row(18, "a", 1, 7), row(21, "a", 1, 10)];
        let checked = check(&rows, &marks);
        assert!(checked.copies.is_empty());
        assert_eq!(
            checked.gaps,
            vec![
                Gap {
                    replica: "a".into(),
                    segment: 1,
                    first: 5,
                    last: 6
                },
                Gap {
                    replica: "a".into(),
                    segment: 1,
                    first: 8,
                    last: 8
                },
            ]
        );
        assert_eq!(checked.gaps.iter().map(Gap::len).sum::<u64>(), 3);
        assert_eq!(checked.marks[&("a".into(), 1)], 10);
    }

    #[test]
    fn the_first_rows_of_a_segment_deleted_are_a_gap_too() {
        let checked = check(&[row(5, "a", 2, 3)], &HashMap::new());
        assert_eq!(
            checked.gaps,
            vec![Gap {
                replica: "a".into(),
                segment: 2,
                first: 1,
                last: 2
            }]
        );
    }

    #[test]
    fn a_number_taken_before_or_twice_is_a_copy() {
        let marks = HashMap::from([(("a".to_string(), 1), 4)]);
        let rows = [
            row(30, "a", 1, 3), // sequenced in an earlier run
            row(31, "a", 1, 5),
            row(32, "a", 1, 5), // the same row twice in this run
            row(33, "a", 1, 6),
        ];
        let checked = check(&rows, &marks);
        assert_eq!(checked.copies, HashSet::from([30, 32]));
        assert!(checked.gaps.is_empty());
        assert_eq!(checked.marks[&("a".into(), 1)], 6);
    }

    #[test]
    fn only_copies_leave_the_mark_where_it_was() {
        let marks = HashMap::from([(("a".to_string(), 1), 4)]);
        let checked = check(&[row(30, "a", 1, 4)], &marks);
        assert_eq!(checked.copies, HashSet::from([30]));
        assert!(checked.marks.is_empty(), "{:?}", checked.marks);
    }

    #[test]
    fn a_new_segment_after_an_uncertain_commit_starts_again_at_one() {
        let mut position = QueuePosition::at(1);
        assert_eq!(position.numbers(3), vec![1, 2, 3]);
        position.committed(3);
        assert_eq!(position.numbers(2), vec![4, 5]);
        position.uncertain();
        assert_eq!(
            position,
            QueuePosition {
                segment: 2,
                next: 1,
                chain: (1, 3)
            }
        );
        // Segment 1 stops at 3 (the uncertain 4 and 5 may never come):
        // not a gap; segment 2 goes on from 1.
        let checked = check(
            &[
                row(1, "a", 1, 1),
                row(2, "a", 1, 2),
                row(3, "a", 1, 3),
                first_of(4, "a", 2, 3),
            ],
            &HashMap::new(),
        );
        assert!(checked.gaps.is_empty() && checked.copies.is_empty());
        // A commit that fails at once passes the chain on: segment 3 still
        // names segment 1's last.
        position.uncertain();
        assert_eq!((position.segment, position.chain), (3, (1, 3)));
        let skipped = check(
            &[Numbered {
                chain: (1, 3),
                ..row(5, "a", 3, 1)
            }],
            &HashMap::from([(("a".to_string(), 1), 1)]),
        );
        assert_eq!(
            skipped.gaps,
            vec![Gap {
                replica: "a".into(),
                segment: 1,
                first: 2,
                last: 3
            }]
        );
        // Two processes' first segments differ.
        assert_ne!(
            QueuePosition::start().segment,
            QueuePosition::start().segment
        );
    }

    #[test]
    fn the_rows_before_a_provoked_failure_are_not_an_unchecked_tail() {
        // Segment 1 committed 1..=4; an intruder deleted 3 and 4 (nothing
        // of segment 1 follows them), then made the next commit fail, so
        // the replica went on in segment 2, which names 4 as the last.
        let marks = HashMap::from([(("a".to_string(), 1), 2)]);
        let checked = check(&[first_of(9, "a", 2, 4), row(10, "a", 2, 2)], &marks);
        assert_eq!(
            checked.gaps,
            vec![Gap {
                replica: "a".into(),
                segment: 1,
                first: 3,
                last: 4
            }]
        );
        assert_eq!(checked.marks[&("a".into(), 1)], 4);
        assert_eq!(checked.marks[&("a".into(), 2)], 2);
        // Checked once: segment 2 has its mark now, its later rows name
        // the same `after` and raise nothing.
        let next = check(
            &[Numbered {
                chain: (1, 4),
                ..row(11, "a", 2, 3)
            }],
            &checked.marks,
        );
        assert!(next.gaps.is_empty(), "{:?}", next.gaps);
        // The rows before arrived, in this run or earlier: no gap.
        let whole = check(
            &[row(5, "a", 1, 3), row(6, "a", 1, 4), first_of(9, "a", 2, 4)],
            &marks,
        );
        assert!(whole.gaps.is_empty(), "{:?}", whole.gaps);
    }

    #[test]
    fn a_tag_covers_replica_segment_number_and_record() {
        let key = key();
        let tag = row_tag(&key, "replica-a", (1, 7, (0, 0)), b"record");
        assert!(row_is_authentic(
            &key,
            "replica-a",
            (1, 7, (0, 0)),
            b"record",
            &tag
        ));
        for (replica, position, record) in [
            ("replica-b", (1, 7, (0, 0)), b"record".as_slice()),
            ("replica-a", (2, 7, (0, 0)), b"record"),
            ("replica-a", (1, 8, (0, 0)), b"record"),
            ("replica-a", (1, 7, (0, 5)), b"record"),
            ("replica-a", (1, 7, (0, 0)), b"recorx"),
            // The name's length is in the tag: moving bytes between name
            // and numbers changes it.
            ("replica-a\0", (1, 7, (0, 0)), b"record"),
        ] {
            assert!(
                !row_is_authentic(&key, replica, position, record, &tag),
                "{replica:?} {position:?}"
            );
        }
        // Number 0 takes the old tag of the bytes alone, and only that.
        let legacy = ring::hmac::sign(&key, b"onceonly-audit-queue-v1\0record")
            .as_ref()
            .to_vec();
        assert!(row_is_authentic(
            &key,
            "any",
            (0, 0, (0, 0)),
            b"record",
            &legacy
        ));
        assert!(!row_is_authentic(
            &key,
            "any",
            (0, 0, (0, 0)),
            b"record",
            &tag
        ));
        assert!(!row_is_authentic(
            &key,
            "replica-a",
            (1, 7, (0, 0)),
            b"record",
            &legacy
        ));
        let mark = mark_tag(&key, "a", 1, 4);
        assert!(mark_is_authentic(&key, "a", 1, 4, &mark));
        assert!(!mark_is_authentic(&key, "a", 1, 5, &mark));
        assert!(!mark_is_authentic(&key, "a", 2, 4, &mark));
    }
}
