"""The client side of the network-namespace test, run inside the hub namespace (``ip netns exec``).

Usage: ``python -m tests.integration._hostile_netns_client LAYOUT.pickle COMMAND.json``; prints one
JSON document. Commands:

- ``{"tour": true}``: the demo tour (`gateway.demo.tour.run_tour`) against the network the layout
  describes, whose gateways listen on 192.0.2.0/24 addresses in their own namespaces;
- ``{"calls": [[force, method, timeout, officer], ...]}``: each call once, with its status and time.

The layout is the parent's `NetworkLayout` (pickled without the identity providers' keys, which
are loaded again here from their files).
"""

from __future__ import annotations

import asyncio
import json
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from gateway import client
from gateway._proto.psn.demo.casefiles.v1 import casefiles_pb2, casefiles_pb2_grpc
from gateway._proto.psn.demo.custody.v1 import custody_pb2, custody_pb2_grpc
from gateway._proto.psn.demo.intel.v1 import intel_pb2, intel_pb2_grpc
from gateway.demo.network import DemoNetwork, NetworkLayout
from gateway.demo.tour import run_tour
from gateway.principal import Purpose
from gateway.token import DevIdp

__all__ = ["AddressedLayout", "AddressedNetwork", "main"]

PURPOSE = Purpose("investigation", "OP-NETNS-1", "namespace partition test")


@dataclass(frozen=True)
class AddressedLayout(NetworkLayout):
    """A layout whose gateways listen on the given addresses instead of 127.0.0.1."""

    addresses: dict[str, str] | None = None

    def local_address(self, force: str) -> str:
        """The local listener of `force`, on its namespace's address."""
        assert self.addresses is not None
        return f"{self.addresses[force]}:{self.ports[force].local}"


class AddressedNetwork(DemoNetwork):
    """A demo network description whose manifest names the namespaces' addresses."""

    def manifest(self) -> dict[str, Any]:
        """The manifest, with each force's peer address on its namespace's address."""
        out = super().manifest()
        layout = self.layout
        assert isinstance(layout, AddressedLayout) and layout.addresses is not None
        for force, entry in out["forces"].items():
            entry["peer_address"] = f"{layout.addresses[force]}:{layout.ports[force].peer}"
        return out


def load_layout(path: Path) -> AddressedLayout:
    """The pickled layout, with its identity providers loaded from their files."""
    fields = pickle.loads(path.read_bytes())  # written by the test that started this process
    idps = {force: DevIdp.load(fields["root"] / "idp" / force) for force in fields["ports"]}
    return AddressedLayout(idps=idps, **fields)


_CALLS = {
    "Search": lambda ch, t: intel_pb2_grpc.IntelligenceSearchStub(ch).Search(
        intel_pb2.SearchRequest(subject="alpha"), timeout=t
    ),
    "GetRecord": lambda ch, t: custody_pb2_grpc.CustodyRecordsStub(ch).GetRecord(
        custody_pb2.GetRecordRequest(custody_number="HC/00001/26"), timeout=t
    ),
    "FetchDocument": lambda ch, t: list(
        casefiles_pb2_grpc.CaseFilesStub(ch).FetchDocument(
            casefiles_pb2.FetchDocumentRequest(case_reference="C", document_id="D"), timeout=t
        )
    ),
}


def _call(manifest: Path, force: str, method: str, timeout: float, officer: str) -> dict[str, Any]:
    endpoint = client.from_manifest(manifest, force)
    token = endpoint.unsafe_dev_token(officer=officer, units=("serocu",), roles=("investigator",), clearance="SC")
    started = time.monotonic()
    try:
        with endpoint.secure_channel(token=token, purpose=PURPOSE) as ch:
            _CALLS[method](ch, timeout)
        status = "OK"
    except grpc.RpcError as exc:
        status = exc.code().name
    return {"force": force, "method": method, "status": status, "seconds": time.monotonic() - started}


def main(argv: list[str]) -> int:
    """Run the command; print its JSON result."""
    layout = load_layout(Path(argv[0]))
    command = json.loads(argv[1])
    network = AddressedNetwork(layout)
    manifest = network.write_manifest()
    if command.get("tour"):
        results = asyncio.run(run_tour(network))
        out: Any = [
            {"caller": r.step.caller, "method": r.step.method, "expected": r.step.expected, "got": r.got}
            for r in results
        ]
    else:
        out = [_call(manifest, *call) for call in command["calls"]]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
