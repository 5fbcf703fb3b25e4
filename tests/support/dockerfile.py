"""Read deploy/Dockerfile and .dockerignore the way docker build does, as far
as the replay in test_dockerfile.py needs: instructions by stage, RUN flags
apart from the command, exec-form arguments, and the build context that
.dockerignore lets through."""

from __future__ import annotations

import fnmatch
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str
    line: int

    def exec_form(self) -> list[str]:
        """The JSON array of CMD/ENTRYPOINT (HEALTHCHECK: the part after CMD)."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = text[text.index(" CMD ") + len(" CMD ") :]
        value = json.loads(text)
        assert isinstance(value, list), f"line {self.line}: {self.keyword} is not in exec form"
        return [str(v) for v in value]

    def run_flags(self) -> tuple[dict[str, dict[str, str]], str]:
        """A RUN's flags (`--mount=type=bind,source=...` as {"mount": {...}})
        and its shell command."""
        flags: dict[str, dict[str, str]] = {}
        rest = self.args
        while rest.startswith("--"):
            word, _, rest = rest.partition(" ")
            name, _, value = word[2:].partition("=")
            flags[name] = dict(kv.partition("=")[::2] for kv in value.split(","))
            rest = rest.lstrip()
        return flags, rest


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """ENV NAME=VALUE pairs (quotes taken off; no expansion)."""
        return _pairs(self.all("ENV"))

    def labels(self) -> dict[str, str]:
        return _pairs(self.all("LABEL"))


def _pairs(instructions: list[Instruction]) -> dict[str, str]:
    values: dict[str, str] = {}
    for i in instructions:
        for pair in _split_words(i.args):
            name, _, value = pair.partition("=")
            values[name] = value
    return values


def _split_words(text: str) -> list[str]:
    """Words separated by blanks, double quotes grouping (ENV/LABEL pairs)."""
    words, word, quoted = [], "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif ch.isspace() and not quoted:
            if word:
                words.append(word)
            word = ""
        else:
            word += ch
    if word:
        words.append(word)
    return words


def parse(path: Path = DOCKERFILE) -> list[Stage]:
    """The stages of a Dockerfile; instructions before the first FROM (ARG)
    are left out."""
    stages: list[Stage] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # comments end no instruction, not even inside a continuation
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        instruction = Instruction(keyword.upper(), args.strip(), start)
        if instruction.keyword == "FROM":
            base, _, name = instruction.args.partition(" AS ")
            stages.append(Stage(name.strip(), base.strip()))
        elif stages:
            stages[-1].instructions.append(instruction)
    return stages


def _ignore_rules() -> list[tuple[bool, str]]:
    """(.dockerignore) (excluded?, pattern) in order; the last match wins."""
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((not negated, line.lstrip("!").strip("/")))
    return rules


def _matches(pattern: str, path: str) -> bool:
    """A pattern matches a path or any folder it is in; `**/` matches no folder too."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    patterns = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
    # fnmatch's * crosses "/", which only makes `**` patterns work; the plain
    # patterns here name top-level entries or exact paths.
    return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns)


def excluded(path: str, rules: list[tuple[bool, str]]) -> bool:
    verdict = False
    for exclude, pattern in rules:
        if _matches(pattern, path):
            verdict = exclude
    return verdict


def copy_context(destination: Path) -> list[str]:
    """Copy what .dockerignore lets into the build context; returns the paths."""
    rules = _ignore_rules()
    kept_roots = {pattern.split("/")[0] for exclude, pattern in rules if not exclude}
    copied = []
    for top in sorted(ROOT.iterdir()):
        if top.name not in kept_roots and excluded(top.name, rules):
            continue  # nothing below it can come back: skip .git, .venv...
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if not excluded(rel, rules):
                (destination / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, destination / rel)
                copied.append(rel)
    return copied
