"""--mix: which user classes run, and their weights ("reinit-loop:4,faults:1")."""

from __future__ import annotations

CLASS_NAMES = {
    "reinit-loop": "ReinitLoopUser",
    "migration": "MigrationUser",
    "precopy-hammer": "PrecopyHammerUser",
    "faults": "FaultsUser",
}
DEFAULT_MIX = "reinit-loop:1,migration:1,precopy-hammer:1,faults:1"
MAX_WEIGHT = 1000


def parse_mix(text: str) -> dict[str, int]:
    """{flow: weight}, in the order given; ValueError naming what is wrong."""
    mix: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, weight = item.partition(":")
        kind = kind.strip()
        if kind not in CLASS_NAMES:
            raise ValueError(f"--mix: no user class {kind!r} (one of {', '.join(CLASS_NAMES)})")
        if kind in mix:
            raise ValueError(f"--mix: {kind} given twice")
        try:
            w = int(weight) if weight.strip() else 1
        except ValueError:
            raise ValueError(f"--mix: {kind}'s weight {weight!r} is not a whole number") from None
        if not 1 <= w <= MAX_WEIGHT:
            raise ValueError(f"--mix: {kind}'s weight {w} is not between 1 and {MAX_WEIGHT}")
        mix[kind] = w
    if not mix:
        raise ValueError("--mix: no user class")
    return mix
