//! Audit signing key rotation: a hand-over record in the log, signed by the
//! old key, names the new one; the head of its batch and every later head
//! are signed by the new key. A verifier that trusts any key of the chain
//! rebuilds the chain from the log, checks every link, and then knows which
//! key must have signed each head.
//!
//! Because the hand-overs are log entries, they are covered by the Merkle
//! tree like any record: nobody can add, drop or reorder one unnoticed.

use onceonly_proto::v1::KeyHandover;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

/// What the old key signs.
pub fn message(log_index: u64, old_public_key: &[u8], new_public_key: &[u8]) -> Vec<u8> {
    let mut message = b"onceonly audit key hand-over v1\0".to_vec();
    message.extend_from_slice(&log_index.to_be_bytes());
    message.extend_from_slice(old_public_key);
    message.extend_from_slice(new_public_key);
    message
}

/// The hand-over from `old` to `new` at `log_index`, signed by `old`.
pub fn sign(log_index: u64, old: &Ed25519KeyPair, new_public_key: &[u8]) -> KeyHandover {
    let old_public_key = old.public_key().as_ref().to_vec();
    let signature = old
        .sign(&message(log_index, &old_public_key, new_public_key))
        .as_ref()
        .to_vec();
    KeyHandover {
        old_public_key,
        new_public_key: new_public_key.to_vec(),
        signature,
    }
}

/// The keys that signed a log, in order, and from which record on each was
/// in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChain {
    /// (first record covered, public key); the first starts at 0.
    keys: Vec<(u64, Vec<u8>)>,
}

/// Why a chain of hand-overs does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A hand-over names another old key than the one in force.
    #[error("the hand-over at record {index} starts from a key that was not in force")]
    Broken {
        /// Where.
        index: u64,
    },
    /// A hand-over's signature does not verify under the old key.
    #[error("the hand-over at record {index} is not signed by the key in force before it")]
    BadSignature {
        /// Where.
        index: u64,
    },
    /// The trusted key signed no part of this log.
    #[error("the log was never signed by the trusted key")]
    Untrusted,
}

impl KeyChain {
    /// The chain of a log with these hand-overs (`(log_index, hand-over)`,
    /// in log order), which must include `trusted`. Without hand-overs the
    /// chain is `trusted` alone.
    pub fn build(trusted: &[u8], handovers: &[(u64, KeyHandover)]) -> Result<Self, ChainError> {
        let first = handovers
            .first()
            .map_or(trusted.to_vec(), |(_, h)| h.old_public_key.clone());
        let mut keys = vec![(0, first)];
        for (index, handover) in handovers {
            let (_, current) = keys.last().ok_or(ChainError::Broken { index: *index })?;
            if handover.old_public_key != *current {
                return Err(ChainError::Broken { index: *index });
            }
            UnparsedPublicKey::new(&ED25519, current)
                .verify(
                    &message(*index, &handover.old_public_key, &handover.new_public_key),
                    &handover.signature,
                )
                .map_err(|_| ChainError::BadSignature { index: *index })?;
            keys.push((*index, handover.new_public_key.clone()));
        }
        if !keys.iter().any(|(_, key)| key.as_slice() == trusted) {
            return Err(ChainError::Untrusted);
        }
        Ok(KeyChain { keys })
    }

    /// The key that must have signed a head of `tree_size` records: the
    /// last one handed over at a record below `tree_size`.
    pub fn key_for(&self, tree_size: u64) -> &[u8] {
        self.keys
            .iter()
            .rev()
            .find(|(from, _)| *from == 0 || *from < tree_size)
            .map_or(&[][..], |(_, key)| key.as_slice())
    }

    /// The key in force now.
    pub fn current(&self) -> &[u8] {
        self.keys.last().map_or(&[][..], |(_, key)| key.as_slice())
    }

    /// Whether `key` signed some part of the log.
    pub fn contains(&self, key: &[u8]) -> bool {
        self.keys.iter().any(|(_, k)| k.as_slice() == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Ed25519KeyPair {
        let pkcs8 =
            Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("generate");
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key")
    }

    #[test]
    fn a_chain_is_followed_from_any_of_its_keys() {
        let (a, b, c) = (key(), key(), key());
        let pub_of = |k: &Ed25519KeyPair| k.public_key().as_ref().to_vec();
        let handovers = vec![
            (10, sign(10, &a, &pub_of(&b))),
            (25, sign(25, &b, &pub_of(&c))),
        ];
        for trusted in [&a, &b, &c] {
            let chain = KeyChain::build(&pub_of(trusted), &handovers).expect("chain");
            assert_eq!(chain.key_for(5), pub_of(&a));
            assert_eq!(
                chain.key_for(10),
                pub_of(&a),
                "a head of 10 records precedes the hand-over"
            );
            assert_eq!(
                chain.key_for(11),
                pub_of(&b),
                "the hand-over's own batch is signed anew"
            );
            assert_eq!(chain.key_for(26), pub_of(&c));
            assert_eq!(chain.current(), pub_of(&c));
        }
        assert_eq!(
            KeyChain::build(&pub_of(&key()), &handovers),
            Err(ChainError::Untrusted)
        );
    }

    #[test]
    fn a_forged_or_broken_link_is_named() {
        let (a, b, c) = (key(), key(), key());
        let pub_of = |k: &Ed25519KeyPair| k.public_key().as_ref().to_vec();
        // Signed by c, which was never in force.
        let mut forged = sign(10, &c, &pub_of(&b));
        forged.old_public_key = pub_of(&a);
        assert_eq!(
            KeyChain::build(&pub_of(&a), &[(10, forged)]),
            Err(ChainError::BadSignature { index: 10 })
        );
        // A link that starts from a key not in force.
        let handovers = vec![
            (10, sign(10, &a, &pub_of(&b))),
            (20, sign(20, &c, &pub_of(&a))),
        ];
        assert_eq!(
            KeyChain::build(&pub_of(&a), &handovers),
            Err(ChainError::Broken { index: 20 })
        );
        // A signature moved to another place in the log.
        let moved = sign(10, &a, &pub_of(&b));
        assert_eq!(
            KeyChain::build(&pub_of(&a), &[(11, moved)]),
            Err(ChainError::BadSignature { index: 11 })
        );
    }
}
