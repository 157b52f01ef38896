#!/usr/bin/env python3
"""A requesting authority's client in Python, generated from the .proto files.

Shows that any language's gRPC stack can call the broker over mutual TLS:
it compiles proto/onceonly/v1/*.proto with grpcio-tools into a temporary
folder, connects with the authority's certificate, asks for evidence, and
prints one JSON line per call: the status code name, the ErrorInfo reason,
and for evidence whether the SHA-256 digest it recomputes matches.

usage: authority_client.py --target HOST:PORT --ca CA.pem --cert CERT.pem
       --key KEY.pem --proto-dir DIR --subject IDNR
"""

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


def main():
    parser = argparse.ArgumentParser()
    for flag in ("--target", "--ca", "--cert", "--key", "--proto-dir", "--subject"):
        parser.add_argument(flag, required=True)
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
        calls = [
            ("allowed", "birth-certificate", "§ 9 Abs. 1 BEEG"),
            ("denied", "vehicle-registration", "§ 9 Abs. 1 BEEG"),
        ]
        for name, evidence_type, legal_basis in calls:
            request = evidence.RequestEvidenceRequest(
                request_id=f"python-{name}",
                evidence_type=evidence_type,
                subject=subject,
                purpose="parental-allowance",
                legal_basis=legal_basis,
            )
            try:
                response = stub.RequestEvidence(request, timeout=10)
                payload = response.evidence.payload
                print(json.dumps({
                    "call": name,
                    "code": "OK",
                    "digest_ok": hashlib.sha256(payload).digest() == response.evidence.payload_sha256,
                    "connector": response.evidence.connector_id,
                    "media_type": response.evidence.media_type,
                }))
            except grpc.RpcError as error:
                try:
                    reason = error_reason(error)
                except ImportError:
                    reason = None
                print(json.dumps({"call": name, "code": error.code().name, "reason": reason, "message": error.details()}))


if __name__ == "__main__":
    main()
