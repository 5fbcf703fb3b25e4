"""Handlers added to a grpc.aio server as generic handlers only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc


class GenericHandlersOnly:
    """Stands in for a server while handlers are added: registered method
    handlers (add_registered_method_handlers, which generated code calls after
    adding the same handlers as a generic handler) are added as a generic
    handler instead.

    Why: grpc.aio keeps a request task per registered method and, for every
    call it accepts, waits on all of them again (asyncio.wait): O(methods) of
    Python per call, ~0.5 us a method (~20 us a call for the driver's 36).  A
    generic handler is looked up by name in a dict; calls are answered alike
    (UNIMPLEMENTED for a method nobody serves)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(
        self, handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        self.server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        # Generated code added these as a generic handler already: one more is
        # only ever reached for a method the first does not have (never).
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, handlers),)
        )
