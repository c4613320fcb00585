"""Settings for the whole test session."""

import os

# The tests start gateways and tools as processes while grpc runs in this one: with grpc's fork
# support on, a child can abort between fork and exec (grpc/grpc#43055). Set before grpc loads.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
