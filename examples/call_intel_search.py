r"""Call the intelligence search application through your force's gateway, with your ordinary stubs.

Start a network first (``psngw demo up --dir demo-net`` writes ``demo-net/demo.json``
and keeps running), then, as a SEROCU analyst in Hampshire searching Thames
Valley's intelligence::

    python examples/call_intel_search.py demo-net/demo.json --force hampshire \
        --officer hc-4711 --unit serocu --role analyst --clearance SC \
        --code investigation --case OP-ORCHID-17 --text "Blue van seen near the depot" \
        ALPHA

The officer's token here comes from the demo's UNSAFE development identity
provider; a real application gets it from the force's identity provider and
passes a callback that returns it (``token=session.access_token``).
"""

from __future__ import annotations

import argparse
import sys

import grpc

from gateway import client
from gateway._proto.psn.demo.intel.v1 import intel_pb2, intel_pb2_grpc
from gateway.errors import ConfigError
from gateway.principal import Purpose


def main() -> int:
    """Search once and print the matches, or the status the gateway gave."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", help="the demo manifest (demo.json)")
    parser.add_argument("subject", help="what to search for")
    parser.add_argument("--force", default="hampshire", help="your force (its gateway is the one you call)")
    parser.add_argument("--officer", default="hc-4711")
    parser.add_argument("--unit", action="append", default=[], dest="units")
    parser.add_argument("--role", action="append", default=[], dest="roles")
    parser.add_argument("--clearance", default="SC")
    parser.add_argument("--code", default="investigation", help="justification code")
    parser.add_argument("--case", default="OP-ORCHID-17", help="case or incident reference")
    parser.add_argument("--text", default="Vehicle sighting follow-up", help="why you are searching")
    args = parser.parse_args()

    try:
        endpoint = client.from_manifest(args.manifest, args.force)
    except ConfigError as exc:  # a missing or wrong manifest, a force it does not name
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    token = endpoint.unsafe_dev_token(  # demo only: a real app passes its IdP session's token callback
        officer=args.officer, units=args.units or ["serocu"], roles=args.roles or ["analyst"], clearance=args.clearance
    )
    purpose = Purpose(args.code, args.case, args.text)

    with endpoint.secure_channel(token=token, purpose=purpose) as channel:
        stub = intel_pb2_grpc.IntelligenceSearchStub(channel)  # the ordinary generated stub
        try:
            reply = stub.Search(intel_pb2.SearchRequest(subject=args.subject, max_results=10), timeout=10)
        except grpc.RpcError as exc:
            print(f"refused: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    for match in reply.matches:
        print(f"{match.report_id}  [{match.grading}]  {match.subject}: {match.summary}")
    if not reply.matches:
        print("no matches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
