//! The generated API compiles, round-trips through prost, and the reflection
//! descriptor describes every service.

use std::collections::HashMap;

use onceonly_proto::v1::{
    ErrorReason, Evidence, RequestEvidenceRequest, RequestEvidenceResponse, SubjectId,
    SubjectIdScheme,
};
use prost::Message;

#[test]
fn evidence_request_round_trips() {
    let request = RequestEvidenceRequest {
        request_id: "req-1".into(),
        evidence_type: "birth-certificate".into(),
        subject: Some(SubjectId {
            scheme: SubjectIdScheme::DeIdnr.into(),
            value: "86095742719".into(),
        }),
        jurisdiction: "DE-BE".into(),
        purpose: "parental-allowance".into(),
        legal_basis: "§ 9 Abs. 1 BEEG".into(),
        consent_id: String::new(),
        parameters: HashMap::from([("licence_plate".into(), "B-OO 1234".into())]),
        encryption_certificate: vec![0x30, 0x82],
        signed_request: "eyJ.e30.c2ln".into(),
        correlation_ids: vec![onceonly_proto::v1::CorrelationId {
            name: "oots.conversation_id".into(),
            value: "conv-1".into(),
        }],
    };
    let bytes = request.encode_to_vec();
    let decoded = RequestEvidenceRequest::decode(bytes.as_slice()).expect("decodes");
    assert_eq!(decoded, request);
    assert_eq!(
        decoded.subject.as_ref().map(|s| s.scheme()),
        Some(SubjectIdScheme::DeIdnr)
    );
}

#[test]
fn evidence_response_round_trips_with_timestamp() {
    let response = RequestEvidenceResponse {
        request_id: "r".into(),
        exchange_id: "x".into(),
        evidence: Some(Evidence {
            evidence_type: "birth-certificate".into(),
            payload: b"{}".to_vec(),
            media_type: "application/json".into(),
            payload_sha256: vec![7; 32],
            connector_id: "civil".into(),
            issued_at: Some(prost_types::Timestamp {
                seconds: 1_790_000_000,
                nanos: 5,
            }),
            register_signature: None,
            register_jws: "eyJ.e30.sig".into(),
            encrypted_payload: Some(onceonly_proto::v1::EncryptedPayload {
                suite: "HPKE-Base-P256-SHA256-A256GCM".into(),
                encapsulated_key: vec![4; 65],
                ciphertext: vec![9; 40],
                recipient_certificate_sha256: vec![1; 32],
            }),
        }),
        audit_log_index: 42,
        audit_receipt: Some(onceonly_proto::v1::AuditReceipt {
            leaf_hash: vec![1; 32],
            batch_size: 3,
            batch_index: 2,
            batch_path: vec![vec![2; 32], vec![3; 32]],
            replica: "r1".into(),
            ..Default::default()
        }),
    };
    let decoded =
        RequestEvidenceResponse::decode(response.encode_to_vec().as_slice()).expect("decodes");
    assert_eq!(decoded, response);
}

#[test]
fn unknown_fields_are_tolerated() {
    // A newer client may send fields this version does not know (field 99).
    let mut bytes = SubjectId {
        scheme: SubjectIdScheme::Eidas.into(),
        value: "DE/AT/123".into(),
    }
    .encode_to_vec();
    bytes.extend_from_slice(&[0x98, 0x06, 0x01]); // field 99, varint 1
    let decoded = SubjectId::decode(bytes.as_slice()).expect("decodes");
    assert_eq!(decoded.value, "DE/AT/123");
}

#[test]
fn error_reasons_map_to_info_strings_and_back() {
    assert_eq!(ErrorReason::PolicyDenied.reason(), "POLICY_DENIED");
    assert_eq!(
        ErrorReason::from_reason("CONSENT_MISSING"),
        Some(ErrorReason::ConsentMissing)
    );
    assert_eq!(ErrorReason::from_reason("NO_SUCH_REASON"), None);
}

#[test]
fn descriptor_set_describes_every_service() {
    let set = prost_types::FileDescriptorSet::decode(onceonly_proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set decodes");
    let services: Vec<String> = set
        .file
        .iter()
        .filter(|f| f.package() == "onceonly.v1")
        .flat_map(|f| f.service.iter().map(|s| s.name().to_owned()))
        .collect();
    for expected in [
        "EvidenceService",
        "ConnectorService",
        "ConsentService",
        "AuditService",
    ] {
        assert!(
            services.iter().any(|s| s == expected),
            "{expected} missing: {services:?}"
        );
    }
}
