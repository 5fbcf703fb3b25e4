"""What the firmware service answers when the model raises instead of
answering: a command gets an outbox (status and syndrome, as firmware answers
every command), a scenario request a gRPC status whose ErrorInfo names the
condition.  Never UNKNOWN, never a server that stops answering."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

import grpc

from grpcsvc.errnames import errno_name

from ..link.ifc import CmdStatus, FirmwareError, NoSuchVf, Syndrome
from ..model.limits import LimitReached
from ..model.memory import OutOfMemory
from ..scenario import ScenarioError

log = logging.getLogger("fwemu.service")

DOMAIN = "fwemu.emulator"  # ErrorInfo.domain of what the service refuses


@dataclass(frozen=True, slots=True)
class Failure:
    """An exception as the service answers it."""

    status: int  # the outbox status a command answers with
    syndrome: int
    code: grpc.StatusCode  # what a scenario request answers with
    reason: str  # ErrorInfo.reason
    message: str


def _no_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError | OutOfMemory) or (
        isinstance(e, OSError) and e.errno == errno.ENOMEM
    )


# A refusal the model raises on purpose, as answered: the first row that
# matches (subclasses before their bases).
_REFUSALS: tuple[tuple[type[Exception], int, int, grpc.StatusCode, str], ...] = (
    (
        LimitReached,
        CmdStatus.LIM_ERR,
        Syndrome.FIELD_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "LIMIT_REACHED",
    ),
    (
        NoSuchVf,
        CmdStatus.BAD_PARAM_ERR,
        Syndrome.UNKNOWN_VHCA,
        grpc.StatusCode.NOT_FOUND,
        "NO_SUCH_VF",
    ),
    (
        ScenarioError,
        CmdStatus.BAD_PARAM_ERR,
        Syndrome.FIELD_RANGE,
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_SCENARIO",
    ),
    (
        FirmwareError,
        CmdStatus.BAD_PARAM_ERR,
        Syndrome.FIELD_RANGE,
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST",
    ),
    (
        ValueError,
        CmdStatus.BAD_PARAM_ERR,
        Syndrome.FIELD_RANGE,
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST",
    ),
)


def failure(e: Exception) -> Failure:
    """The answer to an exception from the model: a refused request keeps its
    own reason; memory exhaustion is LIM_ERR / NO_MEMORY (RESOURCE_EXHAUSTED),
    a full per-VF cap RESOURCE_EXHAUSTED (LIMIT_REACHED);
    anything else is the firmware's internal error, logged with its traceback."""
    if _no_memory(e):
        return Failure(
            CmdStatus.LIM_ERR,
            Syndrome.NO_MEMORY,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "NO_MEMORY",
            str(e) or "no memory",
        )
    for kind, status, syndrome, code, reason in _REFUSALS:
        if isinstance(e, kind):
            return Failure(status, syndrome, code, reason, str(e))
    log.error("internal error: %s", e, exc_info=e)
    reason = "RECURSION" if isinstance(e, RecursionError) else "INTERNAL_ERROR"
    if isinstance(e, OSError):
        reason = errno_name(e.errno or 0, "INTERNAL_ERROR")
    return Failure(
        CmdStatus.INT_ERR,
        Syndrome.INTERNAL,
        grpc.StatusCode.INTERNAL,
        reason,
        f"internal error ({type(e).__name__}): {e}",
    )
