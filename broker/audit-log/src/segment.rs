//! The audit log's file, `audit.log` in the data directory: the one place
//! records, tree nodes and signed tree heads are kept, as an append-only
//! sequence of batch frames. A batch is one `write` and one `fdatasync`:
//! the frame on disk is the batch's commit point, as in the CT logs.
//!
//! A frame is a 24-byte header and a body, integers big-endian:
//!
//! ```text
//! header: magic "OOAL" | version 1 | 3 zero bytes | body length u32
//!         | CRC-32 of the body u32 | log index of the first record u64
//! body:   record count u32 | node count u32 | head length u32
//!         | end offset of each record in the record area [u32; count]
//!         | the perfect subtrees the batch completed [32 bytes; node count]
//!         | the signed tree head over the batch (protobuf SignedTreeHead)
//!         | the records (protobuf AuditRecord), back to back
//! ```
//!
//! The subtrees come in the order [`onceonly_merkle::Frontier::push`]
//! yields them, so subtree (level, index) is node number
//! `subtree_position(level, index) - subtrees_completed(first index)` of
//! the frame that holds leaf `last_leaf(level, index)`.
//!
//! The CRC finds torn writes (a crash in the middle of an append); it is
//! no defence against tampering, which the tree and the signed heads are.
//!
//! The writer reserves space ahead of the last frame ([`RESERVE`] bytes at
//! a time, with `fallocate`), so the file usually ends in zeros: an
//! `fdatasync` into reserved space flushes the data alone, where one that
//! grows the file must also write the inode (a quarter to a third of a
//! flush on this project's machines). Where only zeros follow, the frames
//! have ended.

/// Bytes reserved ahead of the last frame at a time.
pub const RESERVE: u64 = 4 << 20;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use onceonly_merkle::Hash;

/// The file's name in the data directory.
pub const FILE_NAME: &str = "audit.log";
/// Bytes before a frame's body.
pub const HEADER_LEN: u64 = 24;
const MAGIC: &[u8; 4] = b"OOAL";
const VERSION: u8 = 1;
/// Bytes of the body before the record end offsets.
const COUNTS_LEN: u64 = 12;

/// One batch, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Log index of the first record.
    pub first_index: u64,
    /// The records' bytes (the Merkle leaves).
    pub records: Vec<Vec<u8>>,
    /// The perfect subtrees the batch completed.
    pub nodes: Vec<Hash>,
    /// The signed tree head over the log up to the end of this batch.
    pub head: Vec<u8>,
}

impl Frame {
    /// The frame's bytes, header included.
    pub fn encode(&self) -> Vec<u8> {
        let mut ends = Vec::with_capacity(self.records.len());
        let mut area = Vec::new();
        for record in &self.records {
            area.extend_from_slice(record);
            ends.push(area.len());
        }
        let mut out = Vec::new();
        encode(
            &mut out,
            self.first_index,
            &ends,
            &area,
            &self.nodes,
            &self.head,
        );
        out
    }
}

/// Writes a frame into `out` (cleared first): `ends` are the end offsets
/// of the records in `records`, back to back.
pub fn encode(
    out: &mut Vec<u8>,
    first_index: u64,
    ends: &[usize],
    records: &[u8],
    nodes: &[Hash],
    head: &[u8],
) {
    let body_len =
        COUNTS_LEN as usize + 4 * ends.len() + 32 * nodes.len() + head.len() + records.len();
    out.clear();
    out.reserve(HEADER_LEN as usize + body_len);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, 0, 0, 0]);
    out.extend_from_slice(&(body_len as u32).to_be_bytes());
    out.extend_from_slice(&[0; 4]); // the CRC, below
    out.extend_from_slice(&first_index.to_be_bytes());
    out.extend_from_slice(&(ends.len() as u32).to_be_bytes());
    out.extend_from_slice(&(nodes.len() as u32).to_be_bytes());
    out.extend_from_slice(&(head.len() as u32).to_be_bytes());
    for end in ends {
        out.extend_from_slice(&(*end as u32).to_be_bytes());
    }
    for node in nodes {
        out.extend_from_slice(node);
    }
    out.extend_from_slice(head);
    out.extend_from_slice(records);
    let crc = crc32fast::hash(&out[HEADER_LEN as usize..]);
    out[12..16].copy_from_slice(&crc.to_be_bytes());
}

/// What lies at an offset of the file.
#[derive(Debug)]
pub enum Read {
    /// A whole frame, `len` bytes with its header; `checksum_ok` false when
    /// its body does not match its CRC (never for the last frame, which is
    /// then [`Read::Torn`]).
    Frame {
        /// The frame.
        frame: Frame,
        /// Its length in the file.
        len: u64,
        /// Whether the body matches the CRC.
        checksum_ok: bool,
    },
    /// The file ends inside a frame, or the last frame (nothing but zeros
    /// after it) fails its checksum: what a crash during an append leaves.
    Torn {
        /// Why it is not a frame.
        reason: String,
    },
    /// The bytes there are no frame, and more data follows.
    Malformed {
        /// Why not.
        reason: String,
    },
    /// The end of the frames: the end of the file, or nothing but zeros
    /// from here (space reserved ahead, or a frame of which nothing landed
    /// before a crash; nobody was answered for it).
    End,
}

/// Reads the frame at `offset` of a file `file_len` bytes long.
pub fn read_at(file: &File, offset: u64, file_len: u64) -> io::Result<Read> {
    if offset >= file_len {
        return Ok(Read::End);
    }
    if offset + HEADER_LEN > file_len {
        return Ok(Read::Torn {
            reason: format!("{} bytes, less than a frame header", file_len - offset),
        });
    }
    let mut header = [0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut header, offset)?;
    if &header[0..4] != MAGIC || header[4] != VERSION {
        return Ok(if only_zeros_from(file, offset, file_len)? {
            Read::End
        } else {
            Read::Malformed {
                reason: "no frame header (wrong magic or version)".to_owned(),
            }
        });
    }
    let body_len = u64::from(u32::from_be_bytes(be4(&header[8..12])));
    let crc = u32::from_be_bytes(be4(&header[12..16]));
    let first_index = u64::from_be_bytes(header[16..24].try_into().unwrap_or_default());
    if offset + HEADER_LEN + body_len > file_len {
        return Ok(Read::Torn {
            reason: format!(
                "the frame claims {body_len} bytes, the file holds {}",
                file_len - offset - HEADER_LEN
            ),
        });
    }
    let mut body = vec![0u8; body_len as usize];
    file.read_exact_at(&mut body, offset + HEADER_LEN)?;
    let checksum_ok = crc32fast::hash(&body) == crc;
    // The last frame failing its checksum is torn: its pages did not all
    // land before the crash. Nobody was answered for it.
    if !checksum_ok && only_zeros_from(file, offset + HEADER_LEN + body_len, file_len)? {
        return Ok(Read::Torn {
            reason: "the last frame fails its checksum".into(),
        });
    }
    match decode_body(first_index, &body) {
        Ok(frame) => Ok(Read::Frame {
            frame,
            len: HEADER_LEN + body_len,
            checksum_ok,
        }),
        Err(reason) => Ok(Read::Malformed { reason }),
    }
}

fn only_zeros_from(file: &File, offset: u64, file_len: u64) -> io::Result<bool> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = offset;
    while at < file_len {
        let n = (file_len - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        if buf[..n].iter().any(|b| *b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

fn be4(bytes: &[u8]) -> [u8; 4] {
    bytes.try_into().unwrap_or_default()
}

/// The layout of a body, from its counts.
#[derive(Debug, Clone, Copy)]
struct Layout {
    count: u64,
    nodes: u64,
    head_len: u64,
}

impl Layout {
    fn parse(counts: &[u8]) -> Self {
        Layout {
            count: u64::from(u32::from_be_bytes(be4(&counts[0..4]))),
            nodes: u64::from(u32::from_be_bytes(be4(&counts[4..8]))),
            head_len: u64::from(u32::from_be_bytes(be4(&counts[8..12]))),
        }
    }
    fn ends_at(&self) -> u64 {
        COUNTS_LEN
    }
    fn nodes_at(&self) -> u64 {
        COUNTS_LEN + 4 * self.count
    }
    fn head_at(&self) -> u64 {
        self.nodes_at() + 32 * self.nodes
    }
    fn records_at(&self) -> u64 {
        self.head_at() + self.head_len
    }
}

fn decode_body(first_index: u64, body: &[u8]) -> Result<Frame, String> {
    if body.len() < COUNTS_LEN as usize {
        return Err("the body is shorter than its counts".into());
    }
    let layout = Layout::parse(&body[..COUNTS_LEN as usize]);
    let records_at = layout.records_at();
    if records_at > body.len() as u64 {
        return Err(format!(
            "{} records, {} nodes and a {}-byte head do not fit a {}-byte body",
            layout.count,
            layout.nodes,
            layout.head_len,
            body.len()
        ));
    }
    let area = &body[records_at as usize..];
    let mut records = Vec::with_capacity(layout.count as usize);
    let mut start = 0usize;
    for i in 0..layout.count {
        let at = (layout.ends_at() + 4 * i) as usize;
        let end = u32::from_be_bytes(be4(&body[at..at + 4])) as usize;
        if end < start || end > area.len() {
            return Err(format!("record {i} of the frame ends outside it"));
        }
        records.push(area[start..end].to_vec());
        start = end;
    }
    if start != area.len() {
        return Err(format!(
            "{} bytes after the last record",
            area.len() - start
        ));
    }
    let nodes = body[layout.nodes_at() as usize..layout.head_at() as usize]
        .chunks_exact(32)
        .map(|c| c.try_into().unwrap_or_default())
        .collect();
    let head = body[layout.head_at() as usize..records_at as usize].to_vec();
    Ok(Frame {
        first_index,
        records,
        nodes,
        head,
    })
}

fn read_layout(file: &File, offset: u64) -> io::Result<Layout> {
    let mut counts = [0u8; COUNTS_LEN as usize];
    file.read_exact_at(&mut counts, offset + HEADER_LEN)?;
    Ok(Layout::parse(&counts))
}

/// Record `i` of the (committed) frame at `offset`.
pub fn read_record(file: &File, offset: u64, i: u64) -> io::Result<Vec<u8>> {
    let layout = read_layout(file, offset)?;
    if i >= layout.count {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the frame at byte {offset} has no record {i}"),
        ));
    }
    let body = offset + HEADER_LEN;
    let mut ends = [0u8; 8];
    let (start, end) = if i == 0 {
        file.read_exact_at(&mut ends[4..], body + layout.ends_at())?;
        (0, u32::from_be_bytes(be4(&ends[4..])))
    } else {
        file.read_exact_at(&mut ends, body + layout.ends_at() + 4 * (i - 1))?;
        (
            u32::from_be_bytes(be4(&ends[..4])),
            u32::from_be_bytes(be4(&ends[4..])),
        )
    };
    if end < start {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("record {i} of the frame at byte {offset} ends before it starts"),
        ));
    }
    let mut record = vec![0u8; (end - start) as usize];
    file.read_exact_at(&mut record, body + layout.records_at() + u64::from(start))?;
    Ok(record)
}

/// Node `j` of the (committed) frame at `offset`.
pub fn read_node(file: &File, offset: u64, j: u64) -> io::Result<Hash> {
    let layout = read_layout(file, offset)?;
    if j >= layout.nodes {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the frame at byte {offset} has no tree node {j}"),
        ));
    }
    let mut node = [0u8; 32];
    file.read_exact_at(&mut node, offset + HEADER_LEN + layout.nodes_at() + 32 * j)?;
    Ok(node)
}

/// The length of the (committed) frame at `offset`, header included.
pub fn frame_len(file: &File, offset: u64) -> io::Result<u64> {
    let mut len = [0u8; 4];
    file.read_exact_at(&mut len, offset + 8)?;
    Ok(HEADER_LEN + u64::from(u32::from_be_bytes(len)))
}

/// Every whole frame of the file at `path`, in order, with its offset and
/// whether its checksum holds; stops at the end or at a torn tail, fails on
/// bytes that are no frame. For tools, tests and verification; the broker
/// reads only what it needs.
pub fn read_all(path: &Path) -> io::Result<Vec<(u64, Frame, bool)>> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut frames = Vec::new();
    let mut offset = 0;
    loop {
        match read_at(&file, offset, file_len)? {
            Read::Frame {
                frame,
                len,
                checksum_ok,
            } => {
                frames.push((offset, frame, checksum_ok));
                offset += len;
            }
            Read::End | Read::Torn { .. } => return Ok(frames),
            Read::Malformed { reason } => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: byte {offset}: {reason}", path.display()),
                ));
            }
        }
    }
}

/// Writes `frames` as the whole file at `path` (tools and tests: a
/// tampering drill rewrites the file as a careful attacker would, with
/// correct checksums).
pub fn write_all(path: &Path, frames: &[Frame]) -> io::Result<()> {
    let mut bytes = Vec::new();
    for frame in frames {
        bytes.extend_from_slice(&frame.encode());
    }
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(first_index: u64, records: &[&[u8]]) -> Frame {
        Frame {
            first_index,
            records: records.iter().map(|r| r.to_vec()).collect(),
            nodes: vec![[7; 32], [9; 32]],
            head: b"head".to_vec(),
        }
    }

    #[test]
    fn frames_round_trip_and_read_in_parts() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(FILE_NAME);
        let frames = [frame(0, &[b"a", b"", b"ccc"]), frame(3, &[b"dddd"])];
        write_all(&path, &frames).expect("write");
        let read = read_all(&path).expect("read");
        assert_eq!(read.len(), 2);
        assert!(read.iter().all(|(_, _, ok)| *ok));
        assert_eq!(read[0].1, frames[0]);
        assert_eq!(read[1].1, frames[1]);
        let file = File::open(&path).expect("open");
        let second = read[1].0;
        assert_eq!(read_record(&file, 0, 2).expect("record"), b"ccc");
        assert_eq!(read_record(&file, 0, 1).expect("record"), b"");
        assert_eq!(read_record(&file, second, 0).expect("record"), b"dddd");
        assert!(read_record(&file, second, 1).is_err());
        assert_eq!(read_node(&file, 0, 1).expect("node"), [9; 32]);
        assert_eq!(frame_len(&file, 0).expect("len"), second);
    }

    #[test]
    fn a_torn_tail_is_told_apart_from_damage_in_the_middle() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(FILE_NAME);
        let whole = frame(0, &[b"record"]).encode();
        // Half a frame at the end: torn.
        std::fs::write(&path, [&whole[..], &whole[..whole.len() / 2]].concat()).expect("write");
        let file = File::open(&path).expect("open");
        let len = file.metadata().expect("meta").len();
        assert!(matches!(
            read_at(&file, whole.len() as u64, len),
            Ok(Read::Torn { .. })
        ));
        // Zeros where a header should be, to the end: the end of the
        // frames (space reserved ahead, or a crash before any of the next
        // frame landed).
        std::fs::write(&path, [&whole[..], &[0u8; 40][..]].concat()).expect("write");
        let file = File::open(&path).expect("open");
        let len = file.metadata().expect("meta").len();
        assert!(matches!(
            read_at(&file, whole.len() as u64, len),
            Ok(Read::End)
        ));
        assert_eq!(read_all(&path).expect("read").len(), 1);
        // Garbage followed by more data: malformed, never silently cut.
        let mut garbage = vec![0xAB; 30];
        garbage.extend_from_slice(&whole);
        std::fs::write(&path, [&whole[..], &garbage[..]].concat()).expect("write");
        assert!(read_all(&path).is_err());
        // A flipped bit inside a whole frame: read, but the checksum fails.
        let mut flipped = whole.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        std::fs::write(&path, [&flipped[..], &whole[..]].concat()).expect("write");
        let read = read_all(&path).expect("read");
        assert!(!read[0].2);
        assert!(read[1].2);
        // The same flipped bit in the last frame: torn, as a crash leaves it,
        // whether the file ends there or in reserved zeros.
        for tail in [&[][..], &[0u8; 4096][..]] {
            std::fs::write(&path, [&whole[..], &flipped[..], tail].concat()).expect("write");
            let file = File::open(&path).expect("open");
            let len = file.metadata().expect("meta").len();
            assert!(matches!(
                read_at(&file, whole.len() as u64, len),
                Ok(Read::Torn { .. })
            ));
            assert_eq!(read_all(&path).expect("read").len(), 1);
        }
        // A frame cut short inside reserved zeros: torn too.
        let mut short = whole.clone();
        let half = short.len() / 2;
        short[half..].fill(0);
        std::fs::write(&path, [&whole[..], &short[..], &[0u8; 4096][..]].concat()).expect("write");
        let file = File::open(&path).expect("open");
        let len = file.metadata().expect("meta").len();
        assert!(matches!(
            read_at(&file, whole.len() as u64, len),
            Ok(Read::Torn { .. })
        ));
    }
}
