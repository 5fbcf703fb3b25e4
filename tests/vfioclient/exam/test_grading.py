"""The exam's grading core, without gRPC: hand-built runs of each trap (the
events and findings a driver would have shown) graded by `grade`, and the
presets each trap arms."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from driver.api.events import ErrorAnswered, Event, Finding, PrecopyAnswered, StateChanged
from fwemu.scenario import parse_scenario
from vfioclient.exam import MISTAKES, TRAPS, Expect, Run, grade, outcome, summary
from vfioclient.exam.runner import split_preset

SRC, DST = "0000:81:00.1", "0000:81:00.2"
MIGRATED_SRC = ["PRE_COPY", "PRE_COPY_P2P", "STOP_COPY", "STOP"]
MIGRATED_DST = ["RESUMING", "STOP", "RUNNING_P2P", "RUNNING"]
STATES = ["RUNNING", "STOP", "PRE_COPY", "PRE_COPY_P2P", "STOP_COPY", "RESUMING", "RUNNING_P2P"]


def arcs(device: str, states: list[str], start: str = "RUNNING") -> list[Event]:
    out = []
    for to in states:
        out.append(Event(0.0, device, StateChanged(start, to)))
        start = to
    return out


def reinit(initial: int = 2 << 20) -> Event:
    return Event(0.0, SRC, PrecopyAnswered(initial, 0, 1, 2, True))


def finding(rule: str, device: str = SRC) -> Finding:
    return Finding(rule, device, 0.0, "orch", "message", "reference")


def migrated(*extra: Event, findings: list[Finding] | None = None, digest: str = "d1") -> Run:
    events = [*arcs(DST, MIGRATED_DST[:1]), *extra, *arcs(SRC, MIGRATED_SRC)]
    events += arcs(DST, MIGRATED_DST[1:], "RESUMING")
    return Run(SRC, DST, events, findings or [], "d1", digest)


def aborted(source_end: str = "RUNNING") -> Run:
    events = [*arcs(DST, ["RESUMING"]), *arcs(SRC, ["PRE_COPY", "PRE_COPY_P2P"])]
    events += arcs(SRC, [source_end], "PRE_COPY_P2P")
    events.append(Event(0.0, DST, StateChanged("RESUMING", "RUNNING", reset=True)))
    return Run(SRC, DST, events)


REINIT_TRAPS = [t for t in TRAPS.values() if t.reinit]


@pytest.mark.parametrize("trap", REINIT_TRAPS, ids=lambda t: t.name)
def test_reinit_trap_passes_a_migration_that_reread_the_new_initial_bytes(trap) -> None:  # type: ignore[no-untyped-def]
    v = grade(trap, migrated(reinit()))
    assert v.passed and v.outcome == "completed" and v.fired, v.reasons


@pytest.mark.parametrize("trap", REINIT_TRAPS, ids=lambda t: t.name)
def test_reinit_trap_fails_a_switchover_without_a_new_ack(trap) -> None:  # type: ignore[no-untyped-def]
    """driver/audit.py stop-copy-with-initial-bytes: the orchestrator left
    PRE_COPY with a REINIT's new initial bytes unread."""
    v = grade(trap, migrated(reinit(), findings=[finding("stop-copy-with-initial-bytes")]))
    assert not v.passed
    assert v.reasons == [
        "switched over with initial bytes unread (after a REINIT: without re-arming the "
        "switchover-ack) on the source (audit rule stop-copy-with-initial-bytes)"
    ]


@pytest.mark.parametrize("trap", REINIT_TRAPS, ids=lambda t: t.name)
def test_reinit_trap_fired_only_once_the_source_answered_reinit(trap) -> None:  # type: ignore[no-untyped-def]
    assert grade(trap, migrated(reinit())).fired
    plain = Event(0.0, SRC, PrecopyAnswered(0, 0, 0, 2, False))
    assert not grade(trap, migrated(plain)).fired
    assert not grade(trap, migrated(Event(0.0, DST, PrecopyAnswered(9, 0, 1, 2, True)))).fired


def test_a_reinit_after_the_decision_may_end_in_a_clean_abort() -> None:
    """QEMU 11.1: a REINIT after the switchover decision fails the migration."""
    run = aborted()
    run.events.insert(0, reinit())
    v = grade(TRAPS["reinit-after-switchover-decision"], run)
    assert v.passed and v.outcome == "aborted"


def test_a_completed_migration_with_another_digest_fails() -> None:
    v = grade(TRAPS["reinit-after-ack"], migrated(reinit(), digest="d2"))
    assert not v.passed
    assert v.reasons == ["destination digest differs (d2 != source d1)"]


def test_a_completed_migration_without_a_source_digest_fails() -> None:
    run = migrated(reinit())
    run.source_digest = ""
    assert not grade(TRAPS["reinit-after-ack"], run).passed


@pytest.mark.parametrize("name", ["save-fails-in-stop-copy", "load-refused", "tracking-lost"])
def test_a_failure_trap_passes_an_abort_that_runs_the_source_again(name: str) -> None:
    v = grade(TRAPS[name], aborted("RUNNING"))
    assert v.passed and v.outcome == "aborted", v.reasons


@pytest.mark.parametrize("name", ["save-fails-in-stop-copy", "load-refused", "tracking-lost"])
def test_a_failure_trap_fails_a_source_left_stopped(name: str) -> None:
    v = grade(TRAPS[name], aborted("STOP"))
    assert not v.passed and v.outcome == "incomplete"
    assert "neither migrated nor rolled back" in v.reasons[0]


def test_a_destination_left_resuming_fails() -> None:
    run = aborted()
    run.events.pop()  # no reset of the destination
    v = grade(TRAPS["load-refused"], run)
    assert v.reasons == ["the destination was left in RESUMING (abort it with a reset)"]


def test_an_abort_trap_fails_a_reported_success() -> None:
    v = grade(TRAPS["load-refused"], migrated())
    assert not v.passed and "cannot have succeeded" in v.reasons[-1]


def test_a_delayed_completion_must_not_be_given_up() -> None:
    trap = TRAPS["completion-delayed"]
    assert trap.expect is Expect.COMPLETE
    assert grade(trap, migrated()).passed
    v = grade(trap, aborted())
    assert not v.passed and v.reasons[0].startswith("gave up")


def test_a_device_without_migration_passes_when_left_alone() -> None:
    trap = TRAPS["not-migratable"]
    refused = Run(SRC, DST, [Event(0.0, SRC, ErrorAnswered(25, "ENOTTY", "device_feature", ""))])
    v = grade(trap, refused)
    assert v.passed and v.outcome == "refused"
    v = grade(trap, Run(SRC, DST, arcs(DST, ["RESUMING"])))
    assert not v.passed
    assert any("changed the state of a device that offers no migration" in r for r in v.reasons)


def test_a_trap_nobody_migrated_fails() -> None:
    v = grade(TRAPS["reinit-after-ack"], Run(SRC, DST))
    assert not v.passed and v.reasons == ["did not migrate the devices"]


def test_a_run_that_did_not_finish_fails() -> None:
    run = migrated(reinit())
    run.finished = False
    v = grade(TRAPS["reinit-after-ack"], run)
    assert not v.passed and v.outcome == "timeout"


@given(
    rules=st.lists(st.sampled_from(sorted(MISTAKES)), max_size=6),
    devices=st.lists(st.sampled_from([SRC, DST]), min_size=6, max_size=6),
    name=st.sampled_from(sorted(TRAPS)),
)
def test_every_finding_fails_the_trap_and_is_named(
    rules: list[str], devices: list[str], name: str
) -> None:
    """Each audit finding on either device is a reason, named by its rule."""
    trap = TRAPS[name]
    run = aborted() if trap.expect is Expect.ABORT else migrated(reinit())
    if trap.expect is Expect.REFUSE:
        run = Run(SRC, DST)
    run.findings = [finding(r, d) for r, d in zip(rules, devices, strict=False)]
    v = grade(trap, run)
    assert v.passed == (not rules)
    for f in run.findings:
        side = "source" if f.device == SRC else "destination"
        assert f"{MISTAKES[f.rule]} on the {side} (audit rule {f.rule})" in v.reasons


@given(
    end=st.sampled_from(STATES),
    name=st.sampled_from(["save-fails-in-stop-copy", "load-refused"]),
)
def test_an_aborted_migration_passes_only_with_the_source_running(end: str, name: str) -> None:
    v = grade(TRAPS[name], aborted(end))
    assert v.passed == (end == "RUNNING")
    assert outcome(aborted(end)) == ("aborted" if end == "RUNNING" else "incomplete")


def test_summary_counts_and_says_whether_all_passed() -> None:
    ok = grade(TRAPS["reinit-after-ack"], migrated(reinit()))
    bad = grade(TRAPS["reinit-after-ack"], migrated(reinit(), digest="x"))
    doc = summary([ok, bad])
    assert (doc["passed"], doc["failed"], doc["all_passed"]) == (1, 1, False)
    assert [t["trap"] for t in doc["traps"]] == ["reinit-after-ack", "reinit-after-ack"]
    assert summary([ok])["all_passed"]


@pytest.mark.parametrize("trap", TRAPS.values(), ids=lambda t: t.name)
def test_each_trap_has_a_preset_that_is_a_scenario_file(trap) -> None:  # type: ignore[no-untyped-def]
    """Each preset is a plain scenario (`fwemu serve --scenario`) of two VFs,
    the destination without workload, and says the trap and the correct way."""
    text = trap.preset.read_text()
    doc = parse_scenario(text, str(trap.preset))
    assert len(doc.vfs) == 2 and doc.vfs[1].dirty_bytes_per_s == 0
    assert "# Trap:" in text and "# Correct" in text and "Wrong" in text
    vfs_text, events = split_preset(text, trap.name)
    assert len(parse_scenario(vfs_text).vfs) == 2 and not parse_scenario(vfs_text).events
    assert all(ev["vf"] in (1, 2) for ev in events)
    # A trap is armed by its file, by a trigger, or is a VF that cannot migrate.
    assert events or trap.trigger is not None or trap.expect is Expect.REFUSE


def test_split_preset_refuses_other_vf_numbers() -> None:
    text = "vfs: [{size: 1MiB}, {size: 1MiB}]\nevents: [{vf: 3, fault: {kind: fail}}]\n"
    with pytest.raises(OSError, match="vf is 1 or 2"):
        split_preset(text, "p")
    with pytest.raises(OSError, match="two VFs"):
        split_preset("vfs: [{size: 1MiB}]\n", "p")


def test_triggers_fire_at_their_moment() -> None:
    drained = Event(0.0, SRC, PrecopyAnswered(0, 4096, 0, 2, False))
    trigger = TRAPS["reinit-after-ack"].trigger
    assert trigger is not None
    assert trigger.when(drained, SRC)
    assert not trigger.when(Event(0.0, SRC, PrecopyAnswered(1, 0, 0, 2, False)), SRC)
    assert not trigger.when(Event(0.0, DST, drained.payload), SRC)
    assert not trigger.when(reinit(0), SRC)
    quiesced = TRAPS["save-fails-in-stop-copy"].trigger
    assert quiesced is not None
    assert quiesced.when(Event(0.0, SRC, StateChanged("PRE_COPY", "PRE_COPY_P2P")), SRC)
    assert not quiesced.when(Event(0.0, SRC, StateChanged("PRE_COPY", "STOP_COPY")), SRC)


def test_the_grader_words_every_audit_rule() -> None:
    """MISTAKES (the client cannot import driver.audit) names each rule of RULES."""
    from driver.audit import RULES

    assert set(MISTAKES) == set(RULES)
