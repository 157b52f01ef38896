#!/usr/bin/env python3
"""A requesting authority's client in Python, generated from the .proto files.

Shows that any language's gRPC stack can call the broker over mutual TLS:
it compiles proto/onceonly/v1/*.proto with grpcio-tools into a temporary
folder, connects with the authority's certificate, asks for evidence, and
prints one JSON line per call: the status code name, the ErrorInfo reason,
and for evidence whether the SHA-256 digest it recomputes matches.

It also checks what the register signed and decrypts what the register
encrypted to it, with standard libraries only, which shows the formats are
the standards and not ours: the register's statement is a JWS (RFC 7515)
verified with PyJWT against the certificate in its x5c header, which must
be issued by the trust domain's CA (cryptography); the encrypted payload is
HPKE (RFC 9180) opened with pyhpke.

usage: authority_client.py --target HOST:PORT --ca CA.pem --cert CERT.pem
       --key KEY.pem --proto-dir DIR --subject IDNR
       [--enc-cert ENC.pem --enc-key ENC.key]
"""

import base64

import argparse
import hashlib
import importlib
import json
import sys
import tempfile

import grpc
from grpc_tools import protoc


def generate(proto_dir, out_dir):
    import grpc_tools

    well_known = grpc_tools.__path__[0] + "/_proto"
    files = [f"onceonly/v1/{name}.proto" for name in ("common", "evidence", "connector", "consent", "audit")]
    code = protoc.main(
        ["protoc", f"-I{proto_dir}", f"-I{well_known}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *files]
    )
    if code != 0:
        sys.exit(f"protoc failed with {code}")
    sys.path.insert(0, out_dir)


def error_reason(error):
    """The google.rpc.ErrorInfo reason in the status details, if any."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            from google.rpc import status_pb2, error_details_pb2  # noqa: F401 (optional)

            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return None


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def subject_hash(exchange_id, scheme_name, value):
    """The subject hash a register's statement carries (common.proto)."""
    parts = [b"onceonly-subject-v1", exchange_id.encode(), scheme_name.encode(), value.encode()]
    return b64url(hashlib.sha256(b"\0".join(parts)).digest())


def sign_request(request, requester, cert_pem, key_pem, subject_scheme, lifetime=120):
    """Signs the request as the authority (RequestEvidenceRequest.signed_request):
    a JWS with PyJWT and the key of its certificate, the chain in x5c. Returns
    the token and its nonce."""
    import secrets
    import time

    import jwt
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

    key = load_pem_private_key(key_pem, password=None)
    algorithm = "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "EdDSA"
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(Encoding.DER)
    nonce = b64url(secrets.token_bytes(18))
    now = int(time.time())
    claims = {
        "iss": requester,
        "rid": request.request_id,
        "non": nonce,
        "iat": now,
        "exp": now + lifetime,
        "evt": request.evidence_type,
        "sbh": subject_hash(nonce, subject_scheme, request.subject.value),
        "pur": request.purpose,
        "lgb": request.legal_basis,
    }
    if request.encryption_certificate:
        claims["ecf"] = b64url(hashlib.sha256(request.encryption_certificate).digest())
    headers = {"typ": "onceonly-request+jwt", "x5c": [base64.b64encode(der).decode()]}
    token = jwt.encode(claims, key, algorithm=algorithm, headers=headers)
    return token, nonce


def check_statement(evidence, exchange_id, requester, subject_scheme, subject_value, ca_pem, signed=None):
    """Verifies the register's JWS and its binding; the claims, or raises."""
    import jwt
    from cryptography import x509

    ca = x509.load_pem_x509_certificate(ca_pem)
    header = jwt.get_unverified_header(evidence.register_jws)
    leaf = x509.load_der_x509_certificate(base64.b64decode(header["x5c"][0]))
    leaf.verify_directly_issued_by(ca)  # raises unless the CA issued it
    import datetime

    now = datetime.datetime.now(datetime.timezone.utc)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise ValueError("check signer: the register's certificate is not valid now")
    if jwt.get_unverified_header(evidence.register_jws).get("typ") != "onceonly-evidence+jwt":
        raise ValueError("check type: not a register statement")
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    connector = f"spiffe://{requester.split('/')[2]}/connector/{evidence.connector_id}"
    if connector not in uris:
        raise ValueError(f"check signer: the statement is signed by {uris}, not {connector}")
    claims = jwt.decode(
        evidence.register_jws,
        key=leaf.public_key(),
        algorithms=["ES256", "EdDSA"],
        options={"require": ["iss", "sub", "xid", "dig"]},
    )
    carried = evidence.encrypted_payload.ciphertext if evidence.HasField("encrypted_payload") else evidence.payload
    expected = {
        "iss": connector,
        "sub": requester,
        "xid": exchange_id,
        "evt": evidence.evidence_type,
        "sbh": subject_hash(exchange_id, subject_scheme, subject_value),
        "dig": b64url(hashlib.sha256(carried).digest()),
        "med": evidence.media_type,
    }
    if signed is not None:
        # Bound to the request this authority signed: its nonce and digest.
        token, nonce = signed
        expected["non"] = nonce
        # What the authority signed: the token up to its last '.'.
        expected["rqd"] = b64url(hashlib.sha256(token.rsplit(".", 1)[0].encode()).digest())
    for claim, value in expected.items():
        if claims.get(claim) != value:
            raise ValueError(f"check binding: claim {claim} is {claims.get(claim)!r}, expected {value!r}")
    if evidence.HasField("encrypted_payload"):
        sealed = evidence.encrypted_payload
        enc = claims.get("enc") or {}
        if enc.get("rcf") != b64url(sealed.recipient_certificate_sha256) or enc.get("ek") != b64url(sealed.encapsulated_key):
            raise ValueError("check binding: the encryption the register signed is not the one that came")
    elif claims.get("enc"):
        raise ValueError("check encryption: the register signed an encrypted payload, a clear one came")
    return claims


def decrypt(evidence, exchange_id, requester, enc_key_pem):
    """Opens the HPKE ciphertext with the authority's encryption key."""
    from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKey

    suite = CipherSuite.new(KEMId.DHKEM_P256_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES256_GCM)
    sealed = evidence.encrypted_payload
    info = b"\0".join([b"onceonly-evidence-v1", exchange_id.encode(), evidence.evidence_type.encode(), requester.encode()])
    context = suite.create_recipient_context(sealed.encapsulated_key, KEMKey.from_pem(enc_key_pem), info=info)
    return context.open(sealed.ciphertext, aad=evidence.media_type.encode())


def main():
    parser = argparse.ArgumentParser()
    for flag in ("--target", "--ca", "--cert", "--key", "--proto-dir", "--subject"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--enc-cert")
    parser.add_argument("--enc-key")
    args = parser.parse_args()

    out_dir = tempfile.mkdtemp(prefix="onceonly-py-")
    generate(args.proto_dir, out_dir)
    common = importlib.import_module("onceonly.v1.common_pb2")
    evidence = importlib.import_module("onceonly.v1.evidence_pb2")
    evidence_grpc = importlib.import_module("onceonly.v1.evidence_pb2_grpc")

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca), private_key=read(args.key), certificate_chain=read(args.cert)
    )
    with grpc.secure_channel(args.target, credentials) as channel:
        stub = evidence_grpc.EvidenceServiceStub(channel)
        subject = common.SubjectId(scheme=common.SUBJECT_ID_SCHEME_DE_IDNR, value=args.subject)
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        requester = x509.load_pem_x509_certificate(read(args.cert)).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier)[0]
        calls = [
            ("allowed", "birth-certificate", "§ 9 Abs. 1 BEEG", b""),
            ("denied", "vehicle-registration", "§ 9 Abs. 1 BEEG", b""),
            ("unsigned", "birth-certificate", "§ 9 Abs. 1 BEEG", b""),
        ]
        if args.enc_cert:
            enc_der = x509.load_pem_x509_certificate(read(args.enc_cert)).public_bytes(Encoding.DER)
            calls.append(("sealed", "birth-certificate", "§ 9 Abs. 1 BEEG", enc_der))
        for name, evidence_type, legal_basis, encryption_certificate in calls:
            request = evidence.RequestEvidenceRequest(
                request_id=f"python-{name}",
                evidence_type=evidence_type,
                subject=subject,
                purpose="parental-allowance",
                legal_basis=legal_basis,
                encryption_certificate=encryption_certificate,
            )
            signed = None
            if name != "unsigned":
                signed = sign_request(request, requester, read(args.cert), read(args.key), "SUBJECT_ID_SCHEME_DE_IDNR")
                request.signed_request = signed[0]
            try:
                response = stub.RequestEvidence(request, timeout=10)
                found = response.evidence
                carried = found.encrypted_payload.ciphertext if found.HasField("encrypted_payload") else found.payload
                line = {
                    "call": name,
                    "code": "OK",
                    "digest_ok": hashlib.sha256(carried).digest() == found.payload_sha256,
                    "connector": found.connector_id,
                    "media_type": found.media_type,
                    "encrypted": found.HasField("encrypted_payload"),
                }
                try:
                    claims = check_statement(
                        found, response.exchange_id, requester, "SUBJECT_ID_SCHEME_DE_IDNR", args.subject, read(args.ca), signed
                    )
                    line["signature_ok"] = True
                    line["bound_to_nonce"] = claims.get("non") == signed[1]
                    line["signed_by"] = claims["iss"]
                except Exception as failure:  # the check that failed, by name
                    line["signature_ok"] = False
                    line["signature_error"] = f"{type(failure).__name__}: {failure}"
                if line["encrypted"] and args.enc_key:
                    plaintext = decrypt(found, response.exchange_id, requester, read(args.enc_key))
                    line["plaintext_sha256"] = hashlib.sha256(plaintext).hexdigest()
                    line["plaintext_has_surname"] = b"<Familienname>" in plaintext
                print(json.dumps(line))
            except grpc.RpcError as error:
                try:
                    reason = error_reason(error)
                except ImportError:
                    reason = None
                print(json.dumps({"call": name, "code": error.code().name, "reason": reason, "message": error.details()}))


if __name__ == "__main__":
    main()
