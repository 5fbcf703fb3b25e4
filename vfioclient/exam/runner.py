"""Running the exam: for each trap, arm its preset on a fresh pair of VFs
through the Scenario service, say which devices the orchestrator under test
must migrate, follow the driver's events while it does (firing the trap's
trigger at its moment), then grade (grading.py) from the events, the audit's
findings and the firmware digests.

The orchestrator runs elsewhere (another process, another language, or a
task of this loop in the tests); the runner knows it is done when it has
opened the devices and closed them all again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from driver.api.events import Event
from fwemu.link.base import LinkError

from ..client import VfioClient, VfioClientError
from ..scenario import ScenarioClient, ScenarioClientError
from .grading import Run, Verdict, grade
from .traps import Trap, Trigger

# (trap, source PCI name, destination PCI name): tell the orchestrator under test
Ready = Callable[[Trap, str, str], Awaitable[None] | None]

POLL_S = 0.02  # how often the devices' open counts are looked at
SETTLE_S = 0.05  # events still in flight once the devices are closed


@dataclass(frozen=True)
class Pair:
    source_vhca: int
    destination_vhca: int
    source: str  # PCI names
    destination: str


def split_preset(text: str, source: str) -> tuple[str, list[dict[str, Any]]]:
    """A preset's VFs part (a scenario of its own) and its events, whose `vf`
    is 1 (the source) or 2 (the destination)."""
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ScenarioClientError(errno.EINVAL, f"{source}: not valid YAML: {e}") from None
    if not isinstance(doc, dict) or len(doc.get("vfs") or []) != 2:
        raise ScenarioClientError(errno.EINVAL, f"{source}: a preset has two VFs (vfs: [src, dst])")
    events = list(doc.pop("events", None) or [])
    for n, ev in enumerate(events):
        if not isinstance(ev, dict) or ev.get("vf") not in (1, 2):
            raise ScenarioClientError(errno.EINVAL, f"{source}: events.{n}: vf is 1 or 2")
    return yaml.safe_dump(doc), events


async def _apply(scenario: ScenarioClient, text: str) -> list[Any]:
    try:
        return await scenario.link.apply_scenario(text)
    except LinkError as e:
        raise ScenarioClientError(errno.EIO, str(e)) from None


async def arm(
    client: VfioClient, scenario: ScenarioClient, trap: Trap, *, timeout: float = 10.0
) -> Pair:
    """Create the preset's two VFs, arm its events on them, and find their
    PCI names on the driver."""
    text = trap.preset.read_text(encoding="utf-8")
    vfs_text, events = split_preset(text, str(trap.preset))
    created = await _apply(scenario, vfs_text)
    ids = [created[0].vhca_id, created[1].vhca_id]
    fns = [created[0].function_id, created[1].function_id]
    if events:
        for ev in events:
            ev["vf"] = ids[ev["vf"] - 1]
        await _apply(scenario, yaml.safe_dump({"events": events}))
    deadline = time.monotonic() + timeout
    while True:
        names = {(d.vhca_id, d.function_id): d.name for d in await client.list_devices()}
        found = [names.get((v, f)) for v, f in zip(ids, fns, strict=True)]
        if found[0] is not None and found[1] is not None:
            return Pair(ids[0], ids[1], found[0], found[1])
        if time.monotonic() > deadline:
            raise VfioClientError(
                errno.ENOENT,
                f"the driver does not list VFs {ids} of {scenario.target}: is --scenario the "
                "firmware of --driver?",
            )
        await asyncio.sleep(POLL_S)


async def _fire(scenario: ScenarioClient, trigger: Trigger, pair: Pair) -> None:
    vhca = pair.source_vhca if trigger.vf == 1 else pair.destination_vhca
    if trigger.reconfigure is not None:
        after = None
        if trigger.on_next_save:
            saved = {v.vhca_id: v.saved_bytes for v in await scenario.list_vfs()}
            after = saved.get(vhca, 0) + 1
        await scenario.reconfigure(vhca, list(trigger.reconfigure), after_saved_bytes=after)
    if trigger.fault is not None:
        args = dict(trigger.fault)
        await scenario.inject_fault(vhca, args.pop("kind"), **args)


class _Watch:
    """The pair's events as they come; fires the trigger once."""

    def __init__(self, scenario: ScenarioClient, trap: Trap, pair: Pair) -> None:
        self.scenario, self.trap, self.pair = scenario, trap, pair
        self.events: list[Event] = []
        self.fired = False
        self.matched = 0  # events the trigger's `when` held for
        self.tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def see(self, ev: Event) -> None:
        if ev.device not in (self.pair.source, self.pair.destination):
            return
        self.events.append(ev)
        trigger = self.trap.trigger
        if trigger is not None and not self.fired and trigger.when(ev, self.pair.source):
            self.matched += 1
            if self.matched >= trigger.nth:
                self.fired = True
                self._spawn(_fire(self.scenario, trigger, self.pair))

    async def drain(self) -> None:
        while self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


async def _follow(stream: Any, watch: _Watch) -> None:
    with contextlib.suppress(VfioClientError, asyncio.CancelledError):
        async for ev in stream:
            watch.see(ev)


async def _wait_done(client: VfioClient, pair: Pair, watch: _Watch, timeout: float) -> bool:
    """True once the orchestrator took the pair's devices (opened them, or an
    event of theirs came) and closed them all again; False at `timeout`."""
    deadline = time.monotonic() + timeout
    opened = False
    while time.monotonic() < deadline:
        counts = {d.name: d.open_count for d in await client.list_devices()}
        held = counts.get(pair.source, 0) + counts.get(pair.destination, 0)
        if held:
            opened = True
        elif opened or watch.events:
            return True
        await asyncio.sleep(POLL_S)
    return False


async def run_trap(
    client: VfioClient,
    scenario: ScenarioClient,
    trap: Trap,
    *,
    timeout: float = 60.0,
    on_ready: Ready | None = None,
    after_run: Callable[[], Awaitable[None]] | None = None,
) -> Verdict:
    """One trap: arm it, announce the devices, wait for the orchestrator
    (`after_run` then, e.g. to reap it), grade, and remove the two VFs."""
    stream = client.events()
    await stream.ready()
    pair = await arm(client, scenario, trap)
    # A VF made in a slot another used before has that one's findings under
    # its name (the audit is by device name): those are not this run's.
    earlier = {_key(f) for f in await _findings(client, pair)}
    watch = _Watch(scenario, trap, pair)
    follower = asyncio.ensure_future(_follow(stream, watch))
    try:
        if on_ready is not None:
            announced = on_ready(trap, pair.source, pair.destination)
            if inspect.isawaitable(announced):
                await announced
        finished = await _wait_done(client, pair, watch, timeout)
        await asyncio.sleep(SETTLE_S)
    finally:
        try:
            if after_run is not None:
                await after_run()
        finally:
            await stream.aclose()
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
    try:
        return await _graded(client, scenario, trap, pair, watch, finished, earlier)
    finally:
        # The pair was the exam's: a lab's firmware keeps no VFs of it.
        for vhca_id in (pair.source_vhca, pair.destination_vhca):
            with contextlib.suppress(LinkError):
                await scenario.link.remove_vf(vhca_id)


async def _graded(
    client: VfioClient,
    scenario: ScenarioClient,
    trap: Trap,
    pair: Pair,
    watch: _Watch,
    finished: bool,
    earlier: set[tuple[object, ...]],
) -> Verdict:
    await watch.drain()
    findings = [f for f in await _findings(client, pair) if _key(f) not in earlier]
    # The source as its stop-copy saw it: the state it had while last
    # suspended.  Not its state when its events come in: the orchestrator may
    # have closed it by then, and the close's FLR runs its workload again.
    run = Run(
        pair.source,
        pair.destination,
        watch.events,
        findings,
        await scenario.digest(pair.source_vhca, suspended=True),
        await scenario.digest(pair.destination_vhca),
        finished,
    )
    return grade(trap, run)


async def _findings(client: VfioClient, pair: Pair) -> list[Any]:
    return [
        f for name in (pair.source, pair.destination) for f in (await client.audit(name)).findings
    ]


def _key(f: Any) -> tuple[object, ...]:
    return (f.rule, f.device, f.time, f.client, f.stream, f.data_fd, f.message)


async def run_exam(
    client: VfioClient,
    scenario: ScenarioClient,
    traps: Sequence[Trap],
    *,
    timeout: float = 60.0,
    deadline: float | None = None,
    attempts: int = 3,
    on_ready: Ready | None = None,
    after_run: Callable[[], Awaitable[None]] | None = None,
    on_verdict: Callable[[Verdict], None] | None = None,
) -> list[Verdict]:
    """Every trap, one at a time, each waiting up to `timeout` for the
    orchestrator, all by `deadline` (time.monotonic(); a trap left without
    time is failed unrun).  A trap whose moment never came (a trigger that
    landed too late for the orchestrator to see it) runs again on a fresh
    pair, up to `attempts` runs; its last verdict counts.  `after_run` is
    awaited after each run (the CLI reaps the orchestrator it started)."""
    verdicts = []
    for trap in traps:
        v: Verdict | None = None
        for attempt in range(1, max(1, attempts) + 1):
            limit = timeout if deadline is None else min(timeout, deadline - time.monotonic())
            if limit <= 0:
                break
            v = await run_trap(
                client, scenario, trap, timeout=limit, on_ready=on_ready, after_run=after_run
            )
            v.attempts = attempt
            if v.fired or not v.passed:
                break
        if v is None:
            v = Verdict(trap.name, False, "timeout", False, ["not run: no time left"])
        elif v.passed and not v.fired:
            # Nothing was shown: an orchestrator that never meets the trap's
            # moment (no PRECOPY_INFO after its switchover decision, say)
            # cannot pass by avoiding it.
            v.passed = False
            v.reasons = [
                f"not shown: the trap's moment never came in {v.attempts} run(s) "
                f"(it waits for this: {trap.what})"
            ]
        if on_verdict is not None:
            on_verdict(v)
        verdicts.append(v)
    return verdicts
