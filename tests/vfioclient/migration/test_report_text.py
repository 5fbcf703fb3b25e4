"""The migration report for a person (`vfioctl migrate`, `vfioctl demo`):
lines cut at spaces to 80 columns, continued under the field's value, and
nothing lost: the words of `report_text` are the unwrapped report's."""

from __future__ import annotations

from typing import Any

import pytest

from fwemu.link.ifc import MiB
from tests.support.vfioclient_migration import in_process_rig
from vfioclient.migration import at_first_ack, migrate
from vfioclient.migration.report import REPORT_WIDTH, report_text

pytestmark = pytest.mark.grpc


def check_wrapped(report: dict[str, Any], width: int) -> list[str]:
    """report_text at `width`: each unwrapped line's words, cut into lines of
    at most `width` columns, the first as it began, the rest indented under
    the field's value (13 columns), or under the status line's text (2)."""
    text = report_text(report, width)
    lines = text.splitlines()
    at = 0
    for whole in report_text(report, 10_000).splitlines():  # no line cut
        words, first = whole.split(), lines[at]
        assert first.startswith(whole[:13]), (whole, first)
        indent = 13 if whole.startswith("  ") else 2
        got = first.split()
        at += 1
        while len(got) < len(words):
            assert lines[at].startswith(" " * indent) and lines[at][indent] != " ", lines[at]
            got += lines[at].split()
            at += 1
        assert got == words
    assert at == len(lines)
    for line in lines:
        # Longer only as one word that has no space to be cut at (a digest).
        assert len(line) <= width or " " not in line[13:], line
    return lines


async def test_a_real_report_fits_80_columns_and_keeps_every_word() -> None:
    """A migration with a REINIT and verified digests: its REINIT, device and
    verified lines are past 80 columns unwrapped."""
    async with in_process_rig() as rig:
        pair, s, d = await rig.pair(size=4 * MiB)
        o = rig.digest_hook([(s, d)])

        async def digests(_: Any) -> tuple[str, str]:
            return rig.fw.digest(s), rig.fw.digest(d)

        async def reconfigure() -> None:
            rig.fw.reconfigure(s)

        o.digests = digests
        at_first_ack(o, pair.name, reconfigure)
        report = (await migrate([pair], o)).to_dict()
    assert max(map(len, report_text(report, 10_000).splitlines())) > REPORT_WIDTH
    lines = check_wrapped(report, REPORT_WIDTH)
    assert report_text(report) == "\n".join(lines)  # 80 columns by default
    assert any(line.startswith("  REINIT     ") for line in lines)
    assert any(line.startswith("  device     ") for line in lines)
    assert "  verified   digests equal" in report_text(report)
    check_wrapped(report, 40)


def test_a_long_error_is_continued_under_the_status() -> None:
    report = {
        "status": "failed",
        "error": "the destination stopped taking data: " + "a long reason " * 10,
        "precopy_bytes": 1 << 20,
        "stop_copy_bytes": 0,
        "iterations": 1,
        "converged": False,
        "total_s": 0.5,
    }
    lines = check_wrapped(report, REPORT_WIDTH)
    assert lines[0].startswith("migration failed: the destination stopped")
    assert lines[1].startswith("  reason a long")
    moved = "  moved      1.0 MiB: precopy 1.0 MiB in 1 iterations (not converged), stop-copy"
    assert moved in lines
