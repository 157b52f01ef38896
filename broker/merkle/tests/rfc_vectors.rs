//! The RFC 6962 / RFC 9162 reference vectors (as published with the
//! Certificate Transparency reference implementations), and properties over
//! every tree shape up to 70 leaves.

use onceonly_merkle::*;
use proptest::prelude::*;

const LEAF_DATA: [&str; 8] = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
];

/// Roots for sizes 0..=8.
const ROOTS: [&str; 9] = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

/// (leaf index, tree size, audit path).
const INCLUSION: [(u64, u64, &[&str]); 4] = [
    (
        0,
        8,
        &[
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        &[
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        3,
        &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
    ),
    (
        1,
        5,
        &[
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
];

/// (first size, second size, proof).
const CONSISTENCY: [(u64, u64, &[&str]); 3] = [
    (
        1,
        8,
        &[
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        2,
        8,
        &[
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        &[
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
];

fn h(hex_str: &str) -> Hash {
    hex::decode(hex_str)
        .expect("hex")
        .try_into()
        .expect("32 bytes")
}

fn leaves() -> Vec<Hash> {
    LEAF_DATA
        .iter()
        .map(|d| leaf_hash(&hex::decode(d).expect("hex")))
        .collect()
}

#[test]
fn leaf_and_node_hashes_use_the_rfc_prefixes() {
    assert_eq!(leaf_hash(b""), h(ROOTS[1]));
    assert_eq!(empty_root(), h(ROOTS[0]));
    let (a, b) = (leaf_hash(b"a"), leaf_hash(b"b"));
    assert_ne!(node_hash(&a, &b), node_hash(&b, &a));
}

#[test]
fn roots_match_the_reference_for_every_size() {
    let leaves = leaves();
    for size in 0..=8 {
        assert_eq!(
            root(&leaves[..], size).expect("root"),
            h(ROOTS[size as usize]),
            "size {size}"
        );
        assert_eq!(mth(&leaves[..size as usize]), h(ROOTS[size as usize]));
    }
}

#[test]
fn inclusion_proofs_match_the_reference_and_verify() {
    let leaves = leaves();
    for (index, size, expected) in INCLUSION {
        let proof = inclusion_proof(&leaves[..], index, size).expect("proof");
        let expected: Vec<Hash> = expected.iter().map(|e| h(e)).collect();
        assert_eq!(proof, expected, "inclusion {index}/{size}");
        verify_inclusion(
            &leaves[index as usize],
            index,
            size,
            &proof,
            &h(ROOTS[size as usize]),
        )
        .expect("verifies");
    }
}

#[test]
fn consistency_proofs_match_the_reference_and_verify() {
    let leaves = leaves();
    for (first, second, expected) in CONSISTENCY {
        let proof = consistency_proof(&leaves[..], first, second).expect("proof");
        let expected: Vec<Hash> = expected.iter().map(|e| h(e)).collect();
        assert_eq!(proof, expected, "consistency {first}->{second}");
        verify_consistency(
            first,
            second,
            &h(ROOTS[first as usize]),
            &h(ROOTS[second as usize]),
            &proof,
        )
        .expect("verifies");
    }
}

fn many(n: usize) -> Vec<Hash> {
    (0..n)
        .map(|i| leaf_hash(&(i as u64).to_be_bytes()))
        .collect()
}

#[test]
fn every_proof_of_every_shape_verifies_and_the_frontier_agrees() {
    let leaves = many(70);
    let mut frontier = Frontier::new();
    for size in 0..=70u64 {
        let root_n = root(&leaves[..], size).expect("root");
        assert_eq!(frontier.root(), root_n, "frontier root at {size}");
        // A frontier rebuilt from the store (as after a restart) continues
        // exactly like the one that saw every append.
        let mut rebuilt = Frontier::from_store(&leaves[..], size).expect("rebuild");
        assert_eq!(
            (rebuilt.size(), rebuilt.root()),
            (frontier.size(), frontier.root())
        );
        if (size as usize) < leaves.len() {
            let mut continued = frontier.clone();
            assert_eq!(
                rebuilt.push(leaves[size as usize]),
                continued.push(leaves[size as usize])
            );
            assert_eq!(rebuilt.root(), continued.root());
        }
        for index in 0..size {
            let proof = inclusion_proof(&leaves[..], index, size).expect("proof");
            verify_inclusion(&leaves[index as usize], index, size, &proof, &root_n)
                .expect("inclusion");
        }
        for first in 0..=size {
            let proof = consistency_proof(&leaves[..], first, size).expect("proof");
            let root_m = root(&leaves[..], first).expect("root");
            verify_consistency(first, size, &root_m, &root_n, &proof).expect("consistency");
        }
        if (size as usize) < leaves.len() {
            frontier.push(leaves[size as usize]);
        }
    }
}

#[test]
fn out_of_range_requests_are_refused() {
    let leaves = leaves();
    assert!(inclusion_proof(&leaves[..], 8, 8).is_err());
    assert!(consistency_proof(&leaves[..], 5, 3).is_err());
    assert_eq!(
        verify_inclusion(&leaves[0], 8, 8, &[], &h(ROOTS[8])),
        Err(VerifyError::IndexOutOfRange { index: 8, size: 8 })
    );
    assert!(verify_consistency(8, 6, &h(ROOTS[8]), &h(ROOTS[6]), &[]).is_err());
    assert!(verify_consistency(6, 8, &h(ROOTS[6]), &h(ROOTS[8]), &[]).is_err());
    assert_eq!(
        verify_consistency(0, 8, &empty_root(), &h(ROOTS[8]), &[]),
        Ok(())
    );
    assert_eq!(
        verify_consistency(4, 4, &h(ROOTS[4]), &h(ROOTS[4]), &[]),
        Ok(())
    );
    assert!(verify_consistency(4, 4, &h(ROOTS[4]), &h(ROOTS[5]), &[]).is_err());
}

proptest! {
    #[test]
    fn a_mangled_proof_never_verifies(size in 2u64..64, index_seed in 0u64..64, flip_at in 0usize..32, which in 0usize..8) {
        let leaves = many(size as usize);
        let index = index_seed % size;
        let root_n = root(&leaves[..], size).expect("root");
        let mut proof = inclusion_proof(&leaves[..], index, size).expect("proof");
        prop_assume!(!proof.is_empty());
        let at = which % proof.len();
        proof[at][flip_at] ^= 0x01;
        prop_assert!(verify_inclusion(&leaves[index as usize], index, size, &proof, &root_n).is_err());

        let first = 1 + index % (size - 1);
        let mut proof = consistency_proof(&leaves[..], first, size).expect("proof");
        let root_m = root(&leaves[..], first).expect("root");
        let at = which % proof.len();
        proof[at][flip_at] ^= 0x01;
        prop_assert!(verify_consistency(first, size, &root_m, &root_n, &proof).is_err());
        let short = &proof[..proof.len() - 1];
        prop_assert!(verify_consistency(first, size, &root_m, &root_n, short).is_err());
    }
}

#[test]
fn frontier_yields_subtrees_in_the_order_of_their_positions() {
    use onceonly_merkle::{Frontier, leaf_hash, subtree_position, subtrees_completed};
    let mut frontier = Frontier::new();
    let mut next = 0u64;
    for n in 0..1000u64 {
        assert_eq!(subtrees_completed(n), next, "after {n} leaves");
        for (level, index, _) in frontier.push(leaf_hash(&n.to_be_bytes())) {
            assert_eq!(
                subtree_position(level, index),
                next,
                "subtree {level}/{index}"
            );
            next += 1;
        }
    }
    assert_eq!(subtrees_completed(1000), next);
}
