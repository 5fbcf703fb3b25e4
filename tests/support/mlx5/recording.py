"""The link between the driver under test and the firmware adapter: it records
every firmware command mlx5vf issues (and the answer), so the arc -> command
tables of the reference (§5.7) can be checked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fwemu.link.ifc import SaveCompletion


@dataclass
class Cmd:
    """One firmware command mlx5vf issued, with its answer."""

    name: str  # QUERY, SAVE, LOAD, SUSPEND, RESUME, FLR
    vhca_id: int
    args: dict[str, Any]
    result: Any = None
    completion: SaveCompletion | None = None

    @property
    def brief(self) -> tuple[Any, ...]:
        """(name, the fields that tell the commands of §5.7 apart)."""
        a = self.args
        if self.name in ("SUSPEND", "RESUME"):
            return (self.name, a["op_mod"])
        if self.name == "QUERY":
            return (self.name, int(a["incremental"]))
        if self.name == "SAVE":
            return (self.name, int(a["incremental"]), int(a["set_track"]))
        return (self.name,)


class RecordingLink:
    """A FirmwareLink + ScenarioLink that forwards to `inner` and records every
    firmware command (scenario calls and host memory pass through unrecorded)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.cmds: list[Cmd] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def query_vhca_migration_state(self, vhca_id: int, **kw: Any) -> Any:
        cmd = Cmd("QUERY", vhca_id, kw)
        self.cmds.append(cmd)
        cmd.result = await self.inner.query_vhca_migration_state(vhca_id, **kw)
        return cmd.result

    async def save_vhca_state(self, vhca_id: int, *, callback: Any, **kw: Any) -> Any:
        cmd = Cmd("SAVE", vhca_id, kw)
        self.cmds.append(cmd)

        def on_completion(c: SaveCompletion) -> None:
            cmd.completion = c
            callback(c)

        cmd.result = await self.inner.save_vhca_state(vhca_id, callback=on_completion, **kw)
        return cmd.result

    async def load_vhca_state(self, vhca_id: int, **kw: Any) -> Any:
        cmd = Cmd("LOAD", vhca_id, kw)
        self.cmds.append(cmd)
        cmd.result = await self.inner.load_vhca_state(vhca_id, **kw)
        return cmd.result

    async def suspend_vhca(self, vhca_id: int, *, op_mod: int) -> Any:
        cmd = Cmd("SUSPEND", vhca_id, {"op_mod": op_mod})
        self.cmds.append(cmd)
        cmd.result = await self.inner.suspend_vhca(vhca_id, op_mod=op_mod)
        return cmd.result

    async def resume_vhca(self, vhca_id: int, *, op_mod: int) -> Any:
        cmd = Cmd("RESUME", vhca_id, {"op_mod": op_mod})
        self.cmds.append(cmd)
        cmd.result = await self.inner.resume_vhca(vhca_id, op_mod=op_mod)
        return cmd.result

    async def function_level_reset(self, vhca_id: int) -> Any:
        cmd = Cmd("FLR", vhca_id, {})
        self.cmds.append(cmd)
        cmd.result = await self.inner.function_level_reset(vhca_id)
        return cmd.result
