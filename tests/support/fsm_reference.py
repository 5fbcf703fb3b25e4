"""The VFIO migration FSM as the reference states it, parsed from its text.

The next-step table and the state requirements are §1.3 and §1.1 of
vfio-mlx5-migration.md, the arcs a driver may be handed §1.2, pasted below and
parsed here without driver.vfio.fsm, so that the tests can catch a wrong table.
`expected` runs the §1.3 algorithm (stopping at ERROR) inside the drivers'
`while (cur != new)` loop; `shortest` and `saving_rule_ok` are the uAPI's path
rules, checked by a BFS over the §1.2 arcs.
"""

from __future__ import annotations

import errno
import re
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import product

from driver.vfio.uapi import MigState
from tests.support.vfio_fakes import FILE_ARCS, P2P, PRE

S = MigState
FLAG_NAMES = {"STOP_COPY": 1, "P2P": P2P, "PRE_COPY": PRE}

REF_STATES = """
| ERROR | 0 | never valid as cur/target (mask is ~0) |
| STOP | 1 | STOP_COPY |
| RUNNING | 2 | STOP_COPY |
| STOP_COPY | 3 | STOP_COPY |
| RESUMING | 4 | STOP_COPY |
| RUNNING_P2P | 5 | STOP_COPY \\| P2P |
| PRE_COPY | 6 | STOP_COPY \\| PRE_COPY |
| PRE_COPY_P2P | 7 | STOP_COPY \\| P2P \\| PRE_COPY |
"""

REF_ARCS = """
* Always: RESUMING->STOP, STOP->RESUMING, STOP->STOP_COPY, STOP_COPY->STOP.
* With P2P: RUNNING->RUNNING_P2P, RUNNING_P2P->RUNNING, RUNNING_P2P->STOP, STOP->RUNNING_P2P.
* With PRE_COPY (no P2P): RUNNING->PRE_COPY, PRE_COPY->RUNNING, PRE_COPY->STOP_COPY.
* With PRE_COPY and P2P: PRE_COPY->RUNNING, PRE_COPY->PRE_COPY_P2P, PRE_COPY_P2P->PRE_COPY,
  PRE_COPY_P2P->RUNNING_P2P, PRE_COPY_P2P->STOP_COPY, RUNNING->PRE_COPY, RUNNING_P2P->PRE_COPY_P2P.
* Neither P2P nor PRE_COPY: RUNNING->STOP, STOP->RUNNING.
"""

REF_TABLE = """
| cur \\ target | STOP | RUNNING | STOP_COPY | RESUMING | RUNNING_P2P | PRE_COPY | PRE_COPY_P2P | ERROR |
|---|---|---|---|---|---|---|---|---|
| STOP | STOP | RUNNING_P2P | STOP_COPY | RESUMING | RUNNING_P2P | RUNNING_P2P | RUNNING_P2P | ERROR |
| RUNNING | RUNNING_P2P | RUNNING | RUNNING_P2P | RUNNING_P2P | RUNNING_P2P | PRE_COPY | RUNNING_P2P | ERROR |
| STOP_COPY | STOP | STOP | STOP_COPY | STOP | STOP | **ERROR** | **ERROR** | ERROR |
| RESUMING | STOP | STOP | STOP | RESUMING | STOP | STOP | STOP | ERROR |
| RUNNING_P2P | STOP | RUNNING | STOP | STOP | RUNNING_P2P | RUNNING | PRE_COPY_P2P | ERROR |
| PRE_COPY | RUNNING | RUNNING | PRE_COPY_P2P | RUNNING | RUNNING | PRE_COPY | PRE_COPY_P2P | ERROR |
| PRE_COPY_P2P | RUNNING_P2P | RUNNING_P2P | STOP_COPY | RUNNING_P2P | RUNNING_P2P | PRE_COPY | PRE_COPY_P2P | ERROR |
| ERROR | ERROR (all columns) | | | | | | | |
"""  # noqa: E501

SAVING_GROUP = {S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY}
BLOCKED = {(S.STOP_COPY, S.PRE_COPY), (S.STOP_COPY, S.PRE_COPY_P2P)}  # uAPI: "blocked"
TARGETS = [*range(8), 8, 0xFFFFFFFF]


def _cells(line: str) -> list[str]:
    return [c.strip().strip("*").strip() for c in line.strip().strip("|").split(" | ")]


def parse_needs() -> dict[int, int | None]:
    """state value -> migration_flags it needs (None: never valid)."""
    needs: dict[int, int | None] = {}
    for line in REF_STATES.strip().splitlines():
        name, value, need = _cells(line)
        assert S[name] == int(value)
        if need.startswith("never"):
            needs[int(value)] = None
        else:
            needs[int(value)] = sum(FLAG_NAMES[f.strip()] for f in need.split("\\|"))
    return needs


def parse_table() -> dict[MigState, dict[MigState, MigState]]:
    lines = REF_TABLE.strip().splitlines()
    columns = [S[c] for c in _cells(lines[0])[1:]]
    table: dict[MigState, dict[MigState, MigState]] = {}
    for line in lines[2:]:
        cells = _cells(line)
        if cells[1].endswith("(all columns)"):
            table[S[cells[0]]] = dict.fromkeys(columns, S[cells[1].split()[0]])
        else:
            table[S[cells[0]]] = dict(zip(columns, (S[c] for c in cells[1:]), strict=True))
    return table


def parse_arcs(flags: int) -> set[tuple[MigState, MigState]]:
    """§1.2: the arcs a driver with these capabilities may be handed."""
    p2p, pre = bool(flags & P2P), bool(flags & PRE)
    groups = re.split(r"^\* ", REF_ARCS.strip(), flags=re.M)
    arcs: set[tuple[MigState, MigState]] = set()
    for group in filter(None, groups):
        title, body = group.split(":", 1)
        applies = {
            "Always": True,
            "With P2P": p2p,
            "With PRE_COPY (no P2P)": pre and not p2p,
            "With PRE_COPY and P2P": pre and p2p,
            # The kernel comment reads "Without P2P and precopy"; its table hands
            # RUNNING<->STOP to every driver without P2P ({SC,PRE}: STOP->RUNNING
            # skips RUNNING_P2P), so the group applies whenever P2P is absent.
            "Neither P2P nor PRE_COPY": not p2p,
        }[title]
        if applies:
            for a, b in re.findall(r"(\w+)->(\w+)", body):
                arcs.add((S[a], S[b]))
    return arcs


NEEDS = parse_needs()
TABLE = parse_table()


def supported(state: int, flags: int) -> bool:
    need = NEEDS.get(state)
    return need is not None and need & flags == need


def expected(cur: MigState, new: int, flags: int) -> tuple[list[tuple[MigState, MigState]], bool]:
    """(arcs handed to the driver, whether the SET fails with EINVAL), per the
    §1.3 algorithm (stopping at ERROR) run by the drivers' while (cur != new) loop."""
    arcs: list[tuple[MigState, MigState]] = []
    while cur != new:
        if not supported(cur, flags) or not supported(new, flags):
            return arcs, True
        nxt = TABLE[cur][S(new)]
        hops = 0
        while nxt != S.ERROR and not supported(nxt, flags):
            nxt = TABLE[nxt][S(new)]
            hops += 1
            assert hops < 8, "reference table loops"
        if nxt == S.ERROR:
            return arcs, True
        arcs.append((cur, nxt))
        cur = nxt
        assert len(arcs) < 8, "reference table does not converge"
    return arcs, False


def saving_rule_ok(states: list[MigState]) -> bool:
    """uAPI: "The path cannot have saving group states as interior arcs, only
    starting/end states".  A path may stay in the saving group it starts in, or
    end in the one it enters (the kernel's own PRE_COPY -> PRE_COPY_P2P ->
    STOP_COPY keeps one data session), but never passes through it."""
    return phases(states) is not None


def phases(states: list[MigState]) -> str | None:
    phase = "prefix" if states[0] in SAVING_GROUP else "outside"
    for s in states[1:]:
        phase = step_phase(phase, s) or ""
        if not phase:
            return None
    return phase


def step_phase(phase: str, s: MigState) -> str | None:
    saving = s in SAVING_GROUP
    if phase == "prefix":
        return "prefix" if saving else "outside"
    if phase == "outside":
        return "suffix" if saving else "outside"
    return "suffix" if saving else None  # left the saving group it had entered


def shortest(cur: MigState, new: MigState, arcs: set[tuple[MigState, MigState]]) -> int | None:
    """Length of the shortest path over `arcs` that keeps the saving-group rule."""
    start = (cur, "prefix" if cur in SAVING_GROUP else "outside")
    dist = {start: 0}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        s, phase = node
        if s == new:
            return dist[node]
        for a, b in arcs:
            nxt_phase = step_phase(phase, b)
            if a == s and nxt_phase is not None and (b, nxt_phase) not in dist:
                dist[(b, nxt_phase)] = dist[node] + 1
                queue.append((b, nxt_phase))
    return None


@dataclass
class SetOutcome:
    """What one MIG_DEVICE_STATE SET did: the arcs the driver was handed, the
    errno (None: success), and the struct copied back."""

    arcs: list[tuple[MigState, MigState]]
    errno: int | None
    copied_back: tuple[int, int]


# Put a fresh device in state `cur`, SET `new` on it with data_fd 1234.
SetState = Callable[[MigState, int], Awaitable[SetOutcome]]


async def mismatches(
    flags: int, set_state: SetState, currents: list[MigState] | None = None
) -> list[str]:
    """Every (cur, target) whose outcome differs from the reference: the
    arcs, EINVAL or success, each arc a §1.2 arc of the capabilities, a
    shortest path with saving-group states only at its ends, the struct
    copied back (data_fd only when the last arc opens a data session)."""
    bad = []
    allowed = parse_arcs(flags)
    for cur, new in product(currents or list(S), TARGETS):
        want_arcs, want_einval = expected(cur, new, flags)
        got = await set_state(cur, new)
        code = got.errno
        if (
            got.arcs != want_arcs
            or (code == errno.EINVAL) != want_einval
            or (code not in (None, errno.EINVAL))
        ):
            bad.append(f"{cur.name}->{new}: got {got.arcs} {code}, want {want_arcs}")
            continue
        state, data_fd = got.copied_back
        last_is_file = bool(want_arcs) and want_arcs[-1] in FILE_ARCS and not want_einval
        if state != new or (data_fd != -1) != last_is_file:
            bad.append(f"{cur.name}->{new}: copied back {state}, {data_fd}")
        for arc in got.arcs:
            if arc not in allowed:
                bad.append(f"{cur.name}->{new}: arc {arc} is not a §1.2 arc")
        if want_einval or cur == new:
            continue
        if not saving_rule_ok([cur] + [b for _, b in want_arcs]):
            bad.append(f"{cur.name}->{new}: passes through the saving group")
        if len(want_arcs) != shortest(cur, S(new), allowed):
            bad.append(f"{cur.name}->{new}: not a shortest path")
    return bad
