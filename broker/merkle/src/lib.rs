//! The Merkle tree of Certificate Transparency (RFC 9162, section 2.1), as
//! pure functions: leaf and node hashing, the tree hash, inclusion and
//! consistency proofs and their verification, and the signed tree heads
//! onceonly's audit log publishes.
//!
//! Nothing here does I/O. Proofs are computed over any [`Subtrees`] store
//! that can give the hash of a *perfect* subtree (2^level leaves starting at
//! a multiple of 2^level); the RFC's recursion only ever needs those, so a
//! log that stores them answers every proof in O(log n) lookups. A verifier
//! needs only this crate, the broker's public key and what the log sends.

pub mod sth;

use sha2::{Digest, Sha256};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// The hash of the empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// RFC 9162 leaf hash: SHA-256(0x00 || data).
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut hash = Sha256::new();
    hash.update([0x00]);
    hash.update(data);
    hash.finalize().into()
}

/// RFC 9162 interior node hash: SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hash = Sha256::new();
    hash.update([0x01]);
    hash.update(left);
    hash.update(right);
    hash.finalize().into()
}

/// Where proofs get subtree hashes from.
pub trait Subtrees {
    /// The store's error.
    type Error;
    /// The hash of the perfect subtree of 2^`level` leaves starting at leaf
    /// `index * 2^level` (level 0 is a leaf hash).
    fn perfect(&self, level: u32, index: u64) -> Result<Hash, Self::Error>;
}

/// Leaf hashes in memory are a store (computing subtrees as needed).
impl Subtrees for [Hash] {
    type Error = std::convert::Infallible;

    fn perfect(&self, level: u32, index: u64) -> Result<Hash, Self::Error> {
        let width = 1u64 << level;
        let start = (index * width) as usize;
        Ok(mth(&self[start..start + width as usize]))
    }
}

/// The tree hash of leaf hashes in memory (RFC 9162 MTH).
pub fn mth(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n as u64) as usize;
            node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
        }
    }
}

/// The largest power of two smaller than `n` (n >= 2).
fn split(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// Why a proof could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError<E> {
    /// The arguments do not describe a proof (index past the size, first
    /// size past the second).
    #[error("{0}")]
    OutOfRange(String),
    /// The store failed.
    #[error("subtree store: {0:?}")]
    Store(E),
}

/// MTH over leaves [start, start + len), where `start` is a multiple of
/// the largest power of two <= len (the RFC recursion guarantees it).
fn range_hash<S: Subtrees + ?Sized>(store: &S, start: u64, len: u64) -> Result<Hash, S::Error> {
    if len.is_power_of_two() {
        let level = len.trailing_zeros();
        return store.perfect(level, start >> level);
    }
    let k = split(len);
    let left = range_hash(store, start, k)?;
    let right = range_hash(store, start + k, len - k)?;
    Ok(node_hash(&left, &right))
}

/// The tree hash of the first `size` leaves.
pub fn root<S: Subtrees + ?Sized>(store: &S, size: u64) -> Result<Hash, S::Error> {
    if size == 0 {
        return Ok(empty_root());
    }
    range_hash(store, 0, size)
}

/// The audit path of leaf `index` in the tree of `size` leaves (RFC 9162
/// 2.1.3.1), from the leaf's sibling up.
pub fn inclusion_proof<S: Subtrees + ?Sized>(
    store: &S,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, ProofError<S::Error>> {
    if index >= size {
        return Err(ProofError::OutOfRange(format!(
            "leaf index {index} is not below tree size {size}"
        )));
    }
    let mut path = Vec::new();
    let (mut start, mut len, mut m) = (0u64, size, index);
    // Walk down, collecting siblings top-down, then reverse.
    while len > 1 {
        let k = split(len);
        if m < k {
            path.push(range_hash(store, start + k, len - k).map_err(ProofError::Store)?);
            len = k;
        } else {
            path.push(range_hash(store, start, k).map_err(ProofError::Store)?);
            start += k;
            m -= k;
            len -= k;
        }
    }
    path.reverse();
    Ok(path)
}

/// The proof that the tree of `second` leaves extends the tree of `first`
/// leaves (RFC 9162 2.1.4.1). Empty where first is 0 or equals second.
pub fn consistency_proof<S: Subtrees + ?Sized>(
    store: &S,
    first: u64,
    second: u64,
) -> Result<Vec<Hash>, ProofError<S::Error>> {
    if first > second {
        return Err(ProofError::OutOfRange(format!(
            "first size {first} is larger than second size {second}"
        )));
    }
    if first == 0 || first == second {
        return Ok(Vec::new());
    }
    let mut proof = Vec::new();
    let (mut start, mut len, mut m, mut complete) = (0u64, second, first, true);
    while m != len {
        let k = split(len);
        if m <= k {
            proof.push(range_hash(store, start + k, len - k).map_err(ProofError::Store)?);
            len = k;
        } else {
            proof.push(range_hash(store, start, k).map_err(ProofError::Store)?);
            start += k;
            m -= k;
            len -= k;
            complete = false;
        }
    }
    if !complete {
        proof.push(range_hash(store, start, m).map_err(ProofError::Store)?);
    }
    proof.reverse();
    Ok(proof)
}

/// Why a proof does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The leaf index is not below the tree size.
    #[error("leaf index {index} is not below tree size {size}")]
    IndexOutOfRange {
        /// The index.
        index: u64,
        /// The size.
        size: u64,
    },
    /// The first size exceeds the second.
    #[error("first size {first} exceeds second size {second}")]
    SizesOutOfOrder {
        /// First.
        first: u64,
        /// Second.
        second: u64,
    },
    /// The proof has the wrong number of hashes for the sizes.
    #[error("the proof has the wrong length")]
    WrongLength,
    /// The proof computes another root than the one given.
    #[error("the proof does not lead to the expected root: the log is not what it claims")]
    RootMismatch,
}

/// Verifies an inclusion proof (RFC 9162 2.1.3.2).
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    path: &[Hash],
    root: &Hash,
) -> Result<(), VerifyError> {
    if index >= size {
        return Err(VerifyError::IndexOutOfRange { index, size });
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if sn == 0 {
            return Err(VerifyError::WrongLength);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(VerifyError::WrongLength);
    }
    if r != *root {
        return Err(VerifyError::RootMismatch);
    }
    Ok(())
}

/// Verifies a consistency proof (RFC 9162 2.1.4.2).
pub fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &Hash,
    second_root: &Hash,
    proof: &[Hash],
) -> Result<(), VerifyError> {
    if first > second {
        return Err(VerifyError::SizesOutOfOrder { first, second });
    }
    if first == second {
        if !proof.is_empty() {
            return Err(VerifyError::WrongLength);
        }
        return if first_root == second_root {
            Ok(())
        } else {
            Err(VerifyError::RootMismatch)
        };
    }
    if first == 0 {
        // Every tree extends the empty tree.
        if !proof.is_empty() {
            return Err(VerifyError::WrongLength);
        }
        return if *first_root == empty_root() {
            Ok(())
        } else {
            Err(VerifyError::RootMismatch)
        };
    }
    if proof.is_empty() {
        return Err(VerifyError::WrongLength);
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if first.is_power_of_two() {
        path.push(*first_root);
    }
    path.extend_from_slice(proof);
    let (mut fn_, mut sn) = (first - 1, second - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if sn == 0 {
            return Err(VerifyError::WrongLength);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(VerifyError::WrongLength);
    }
    if fr != *first_root || sr != *second_root {
        return Err(VerifyError::RootMismatch);
    }
    Ok(())
}

/// How many perfect subtrees (leaves included) a tree of `leaves` leaves
/// has completed: 2n - popcount(n). [`Frontier::push`] yields them in this
/// order (post-order), so a store can keep them in one append-only
/// sequence and find each by [`subtree_position`].
pub fn subtrees_completed(leaves: u64) -> u64 {
    2 * leaves - u64::from(leaves.count_ones())
}

/// The place of perfect subtree (`level`, `index`) in the post-order
/// sequence [`Frontier::push`] yields: it is completed by leaf
/// [`last_leaf`]`(level, index)`, right after that leaf and the `level - 1`
/// subtrees below it.
pub fn subtree_position(level: u32, index: u64) -> u64 {
    subtrees_completed(last_leaf(level, index)) + u64::from(level)
}

/// The last leaf of perfect subtree (`level`, `index`): the leaf whose
/// append completes it.
pub fn last_leaf(level: u32, index: u64) -> u64 {
    ((index + 1) << level) - 1
}

/// The right edge of a growing tree: for each level, the perfect subtree
/// still waiting for its right sibling. Appending a leaf yields the perfect
/// subtrees it completes (for the store), and the root is always at hand.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    pending: Vec<Option<Hash>>,
}

impl Frontier {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// The frontier of the first `size` leaves of `store`.
    pub fn from_store<S: Subtrees + ?Sized>(store: &S, size: u64) -> Result<Self, S::Error> {
        let mut frontier = Frontier {
            size,
            pending: vec![None; 64],
        };
        let mut start = 0u64;
        for level in (0..64u32).rev() {
            if size & (1 << level) != 0 {
                frontier.pending[level as usize] = Some(store.perfect(level, start >> level)?);
                start += 1 << level;
            }
        }
        Ok(frontier)
    }

    /// Leaves so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf hash; returns every perfect subtree it completes as
    /// (level, index, hash), the leaf itself first.
    pub fn push(&mut self, leaf: Hash) -> Vec<(u32, u64, Hash)> {
        if self.pending.len() < 64 {
            self.pending.resize(64, None);
        }
        let mut completed = vec![(0, self.size, leaf)];
        let (mut level, mut index, mut hash) = (0u32, self.size, leaf);
        while index & 1 == 1 {
            let left = self.pending[level as usize].take().unwrap_or(hash);
            hash = node_hash(&left, &hash);
            level += 1;
            index >>= 1;
            completed.push((level, index, hash));
        }
        self.pending[level as usize] = Some(hash);
        self.size += 1;
        completed
    }

    /// The tree hash of all leaves so far.
    pub fn root(&self) -> Hash {
        let mut acc: Option<Hash> = None;
        for hash in self.pending.iter().flatten() {
            acc = Some(match acc {
                None => *hash,
                Some(right) => node_hash(hash, &right),
            });
        }
        acc.unwrap_or_else(empty_root)
    }
}
