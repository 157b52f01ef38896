//! The audit log as an auditor checks it against a running broker: signed
//! heads verified offline, inclusion proofs for delivered evidence, the
//! whole tree recomputed from raw entries, and consistency with a head
//! saved at an earlier audit.

use onceonly_broker::auditor::{AuditorError, SavedHead, load_public_key, verify_remote};
use onceonly_certs::Role;
use onceonly_integration_tests::world::{AUTHORITIES, World, birth_certificate};
use onceonly_proto::v1::audit_service_client::AuditServiceClient;
use onceonly_proto::v1::{GetEntriesRequest, GetInclusionProofRequest, GetSignedTreeHeadRequest};
use tonic::Code;

fn public_key(world: &World) -> Vec<u8> {
    load_public_key(&world.dir.path().join("secrets/audit.key.pub"))
        .expect("public key written by the broker")
}

#[tokio::test]
async fn delivered_evidence_has_an_inclusion_proof_against_the_signed_head() {
    let world = World::start().await;
    let response = world
        .authority(AUTHORITIES[0])
        .request_evidence(birth_certificate("proof-1"))
        .await
        .expect("delivered")
        .into_inner();
    for n in 0..6 {
        let _ = world
            .authority(AUTHORITIES[0])
            .request_evidence(birth_certificate(&format!("more-{n}")))
            .await;
    }
    // The authority itself may check that its exchange is in the log.
    let mut audit = AuditServiceClient::new(world.channel(Role::Authority, AUTHORITIES[0]));
    let head = audit
        .get_signed_tree_head(GetSignedTreeHeadRequest {})
        .await
        .expect("head")
        .into_inner()
        .tree_head
        .expect("head");
    let head = onceonly_broker::audit::head_from_proto(&head).expect("well-formed");
    head.verify(&public_key(&world))
        .expect("signed by the broker's audit key");
    let proof = audit
        .get_inclusion_proof(GetInclusionProofRequest {
            leaf_index: response.audit_log_index,
            tree_size: head.tree_size,
            ..Default::default()
        })
        .await
        .expect("proof")
        .into_inner();
    let path: Vec<onceonly_merkle::Hash> = proof
        .audit_path
        .into_iter()
        .map(|p| p.try_into().expect("32 bytes"))
        .collect();
    let leaf: onceonly_merkle::Hash = proof.leaf_hash.try_into().expect("32 bytes");
    onceonly_merkle::verify_inclusion(
        &leaf,
        response.audit_log_index,
        head.tree_size,
        &path,
        &head.root_hash,
    )
    .expect("included");

    // Past the signed head, or leaf >= size: INVALID_ARGUMENT.
    let status = audit
        .get_inclusion_proof(GetInclusionProofRequest {
            leaf_index: 0,
            tree_size: head.tree_size + 10,
            ..Default::default()
        })
        .await
        .expect_err("beyond the head");
    assert_eq!(status.code(), Code::InvalidArgument);
    // Raw entries are for auditors only.
    let status = audit
        .get_entries(GetEntriesRequest {
            start_index: 0,
            max_entries: 10,
        })
        .await
        .expect_err("not an auditor");
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn an_audit_recomputes_the_tree_and_proves_the_log_extends_the_saved_head() {
    let world = World::start().await;
    for n in 0..5 {
        let _ = world
            .authority(AUTHORITIES[0])
            .request_evidence(birth_certificate(&format!("a-{n}")))
            .await;
    }
    let key = public_key(&world);
    let first = verify_remote(&mut world.auditor(), &key, None, true)
        .await
        .expect("first audit");
    let saved = first.head.expect("non-empty");
    // Five exchanges, after the policy's entry from the broker's start.
    assert_eq!(first.entries_checked, 6);
    let saved_path = world.dir.path().join("saved-head.json");
    SavedHead::store(&saved, &saved_path).expect("save");

    for n in 0..7 {
        let _ = world
            .authority(AUTHORITIES[1])
            .request_evidence(birth_certificate(&format!("b-{n}")))
            .await;
    }
    let saved = SavedHead::load(&saved_path).expect("load");
    let second = verify_remote(&mut world.auditor(), &key, Some(&saved), true)
        .await
        .expect("second audit");
    assert!(second.consistent_with_saved);
    assert_eq!(second.entries_checked, 13);
    assert_eq!(second.head.expect("head").tree_size, 13);

    // A different history, signed with the broker's own key (a fork, as a
    // broker whose key leaked or whose operator rewrote the log would sign),
    // is not extended: the signature verifies, the consistency proof does
    // not.
    let mut rewritten = saved.clone();
    rewritten.root_hash[0] ^= 1;
    let broker_key =
        onceonly_broker::keys::load_audit_key(&world.dir.path().join("secrets/audit.key"))
            .expect("the broker's signing key");
    let forked = onceonly_merkle::sth::SignedTreeHead::sign(
        &broker_key,
        saved.tree_size,
        rewritten.root_hash,
        saved.timestamp_ms,
    );
    forked
        .verify(&key)
        .expect("signed with the broker's own key");
    let result = verify_remote(&mut world.auditor(), &key, Some(&forked), false).await;
    assert!(
        matches!(result, Err(AuditorError::Inconsistent { .. })),
        "{result:?}"
    );

    // A head signed by another key does not verify at all.
    let other_key = ring::signature::Ed25519KeyPair::from_pkcs8(
        ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .expect("key")
            .as_ref(),
    )
    .expect("key");
    let foreign = onceonly_merkle::sth::SignedTreeHead::sign(
        &other_key,
        saved.tree_size,
        saved.root_hash,
        saved.timestamp_ms,
    );
    let result = verify_remote(&mut world.auditor(), &key, Some(&foreign), false).await;
    assert!(
        matches!(&result, Err(AuditorError::File(reason)) if reason.contains("saved head itself does not verify")),
        "{result:?}"
    );

    // With the wrong public key, the broker's own head does not verify.
    let mut wrong = key.clone();
    wrong[0] ^= 1;
    let result = verify_remote(&mut world.auditor(), &wrong, None, false).await;
    assert!(
        matches!(result, Err(AuditorError::BadHead(_))),
        "{result:?}"
    );
}
