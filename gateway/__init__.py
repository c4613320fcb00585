"""psn-gateway: a secure gRPC gateway for sharing police data between forces.

One gateway stands in front of each force's data centre. Applications call
lead-force-hosted applications through their own force's gateway; gateways relay
to each other over mutual TLS with signed envelopes, Casbin policy and a
tamper-evident audit log. See docs/ and ../README.md.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
