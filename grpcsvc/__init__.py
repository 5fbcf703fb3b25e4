"""gRPC service plumbing shared by the services: uvloop, health, reflection,
shutdown, rich errors."""

import os as _os

# gRPC core writes its own INFO lines to stderr (a refused TLS handshake, for
# one), outside our logs and their JSON format: only its errors are wanted.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
