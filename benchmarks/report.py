"""What every benchmark command shares: its options' parser, the parts that
--only selects, and the results printed as text or, with --json, as JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

Results = dict[str, Any]


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The command's parser; its module docstring is the help."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)


def add_output_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")


def selected(only: str | None, parts: Mapping[str, Callable[[], Results]]) -> Results:
    """The results of the parts `only` names (all without --only), each under
    its name with '-' as '_'."""
    return {name.replace("-", "_"): run() for name, run in parts.items() if only in (None, name)}


def print_results(results: Results, as_json: bool, text: Callable[[Results], Iterable[str]]) -> int:
    """Print `results` as JSON (--json), else as the benchmark's lines; exit status 0."""
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        for line in text(results):
            print(line)
    return 0
