"""The gRPC channel options every server and client of this project uses:
messages up to MAX_MESSAGE each way.  A module of its own, so that a client
needs no server module (and its imports: prometheus_client, reflection,
health) to have them."""

from __future__ import annotations

MAX_MESSAGE = 64 << 20

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]
