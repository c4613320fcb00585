"""Helpers for the trust-domain integration tests (tests/integration/test_trust.py).

A network of its own whose gateways reload fast, calls made with any certificate
(an imposter's, a freshly issued one), raw TLS connections to read the leaf a
listener serves, audit records since a moment, and file writes that are atomic
(or deliberately not).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway import client, pki
from gateway._proto.psn.demo.casefiles.v1 import casefiles_pb2, casefiles_pb2_grpc
from gateway._proto.psn.demo.custody.v1 import custody_pb2, custody_pb2_grpc
from gateway._proto.psn.gateway.v1 import relay_pb2
from gateway.server import Gateway
from tests.netharness import (
    PURPOSE,
    NetworkThread,
    Outcome,
    call_outcome,
    case_files,
    custody,
    records_since,
    search,
    wait_for,
)

__all__ = [
    "RELOAD_INTERVAL",
    "Outcome",
    "app_channel",
    "atomic_write",
    "bulk_lookup_until",
    "case_files",
    "custody",
    "fingerprint_of",
    "gateways",
    "metric_value",
    "patched",
    "peer_channel",
    "records_since",
    "reissue",
    "relay_probe",
    "review_until",
    "search",
    "served_leaf",
    "trust_network",
    "wait_for",
]

#: How often the gateways of these tests poll their files (the default is 2 s).
RELOAD_INTERVAL = 0.25
#: The CRL grace these gateways allow past nextUpdate (the default is an hour).
CRL_GRACE = 30.0
#: Certificates within this many days of expiry are reported.
EXPIRY_WARNING_DAYS = 10.0

_REVOCATION = f"""
[revocation]
reload_interval_seconds = {RELOAD_INTERVAL}
crl_grace_seconds = {CRL_GRACE}
expiry_warning_days = {EXPIRY_WARNING_DAYS}
"""


def trust_network(root: Path) -> NetworkThread:
    """A three-force network of its own, whose gateways reload every `RELOAD_INTERVAL` s; started."""
    net = NetworkThread(root)
    for path in net.layout.configs.values():
        path.write_text(path.read_text() + _REVOCATION)
    return net.start()


def gateways(net: NetworkThread) -> dict[str, Gateway]:
    """The running gateways by force."""
    return net.network.gateways


# -- calls ---------------------------------------------------------------------------------


def review_until(channel: grpc.Channel, stop: threading.Event, *, every: float = 0.1) -> Outcome:
    """A CaseFiles.Review bidi stream that stays open, one comment each `every` s, until `stop` (at least 3).

    Checks every comment was acknowledged, in order.
    """
    sent: list[int] = []

    def comments() -> Iterator[casefiles_pb2.ReviewComment]:
        while not stop.is_set() or len(sent) < 3:
            sent.append(len(sent))
            yield casefiles_pb2.ReviewComment(case_reference="C1", paragraph=str(sent[-1]), comment="ok")
            time.sleep(every)

    def call() -> None:
        acks = [a.sequence for a in casefiles_pb2_grpc.CaseFilesStub(channel).Review(comments(), timeout=60)]
        assert acks == list(range(1, len(sent) + 1)), (acks, len(sent))

    return call_outcome(call)


def bulk_lookup_until(channel: grpc.Channel, stop: threading.Event, *, every: float = 0.1) -> Outcome:
    """A CustodyRecords.BulkLookup client stream that stays open, one number each `every` s, until `stop`."""
    numbers: list[str] = []

    def requests() -> Iterator[custody_pb2.GetRecordRequest]:
        while not stop.is_set() or len(numbers) < 3:
            numbers.append(f"HC/{len(numbers) % 3 + 1:05d}/26")
            yield custody_pb2.GetRecordRequest(custody_number=numbers[-1])
            time.sleep(every)

    def call() -> None:
        summary = custody_pb2_grpc.CustodyRecordsStub(channel).BulkLookup(requests(), timeout=60)
        assert [r.custody_number for r in summary.found] == numbers and not summary.not_found

    return call_outcome(call)


def app_channel(net: NetworkThread, force: str, cert: Path, key: Path, *, ca: Path | None = None) -> grpc.Channel:
    """A channel to `force`'s local listener presenting `cert` (a PEM chain) and `key`, with token and purpose.

    The client trusts `ca` (default: the force's CA file).
    """
    endpoint = client.from_manifest(net.manifest(), force)
    token = endpoint.unsafe_dev_token(officer="DC-2001", units=("serocu",), roles=("investigator",), clearance="SC")
    return client.secure_channel(
        endpoint.local_address,
        ca=ca or endpoint.ca,
        cert=cert,
        key=key,
        server_name=endpoint.server_name,
        token=token,
        purpose=PURPOSE,
    )


def peer_channel(net: NetworkThread, force: str, cert: Path, key: Path) -> grpc.Channel:
    """A channel to `force`'s peer listener presenting `cert` and `key`, as a peer gateway would."""
    endpoint = client.from_manifest(net.manifest(), force)
    creds = grpc.ssl_channel_credentials(endpoint.ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    return grpc.secure_channel(
        endpoint.peer_address, creds, options=[("grpc.ssl_target_name_override", endpoint.server_name)]
    )


def relay_probe(channel: grpc.Channel, *, timeout: float = 10) -> Outcome:
    """A relay call with no envelope: a peer that passes the peer-identity stage gets INVALID_ARGUMENT."""
    relay = channel.unary_unary(
        "/psn.gateway.v1.Relay/Unary",
        request_serializer=relay_pb2.UnaryRelayRequest.SerializeToString,
        response_deserializer=relay_pb2.UnaryRelayResponse.FromString,
    )
    return call_outcome(lambda: relay(relay_pb2.UnaryRelayRequest(), timeout=timeout))


# -- what the gateways show ------------------------------------------------------------------


def metric_value(gateway: Gateway, name: str, **labels: str) -> float | None:
    """The value of one series in the gateway's Prometheus exposition, None if absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    text = gateway.registry.expose().decode("utf-8")
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if match and match[1] == name and ",".join(sorted((match[2] or "").split(","))) == want:
            return float(match[3])
    return None


def served_leaf(address: str, *, server_name: str, ca: Path, cert: Path, key: Path) -> bytes:
    """The DER leaf a listener serves to a new TLS connection (a raw handshake with Python's ssl module)."""
    host, _, port = address.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def fingerprint_of(cert: bytes | Path | x509.Certificate) -> str:
    """SHA-256 of a certificate's DER (given as DER bytes, a PEM file or a parsed certificate), hex."""
    if isinstance(cert, Path):
        cert = x509.load_pem_x509_certificate(cert.read_bytes())
    if isinstance(cert, x509.Certificate):
        cert = cert.public_bytes(Encoding.DER)
    return hashlib.sha256(cert).hexdigest()


# -- files ---------------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace `path` in one rename, so a reader sees the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def reissue(material: pki.ForceMaterial, kind: pki.CertKind, *, days: int | None = None) -> pki.Issued:
    """Re-issue the gateway's own TLS or signing certificate and key in place (what an operator's rotation does)."""
    current = material.gateway_tls if kind is pki.CertKind.GATEWAY_TLS else material.gateway_signing
    stem = current.cert_path.with_suffix("")
    return pki.issue(material.ca_dir, kind, out_stem=stem, days=days, overwrite=True)


@contextmanager
def patched(obj: object, name: str, wrapper: Callable[[Any], Any]) -> Iterator[None]:
    """Replace the bound method `name` of `obj` by `wrapper(original)` for the block (instance attribute)."""
    original = getattr(obj, name)
    setattr(obj, name, wrapper(original))
    try:
        yield
    finally:
        delattr(obj, name)
