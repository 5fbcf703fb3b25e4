"""What a module imports, read from its source (no import runs): every
`import` and `from ... import` anywhere in the file (inside functions and
under TYPE_CHECKING too), relative ones resolved, and `importlib.import_module`
of a constant name; and layering rules over those imports."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Import:
    """One import statement of a file."""

    file: Path  # relative to the tree's root
    line: int
    statement: str  # as written
    modules: tuple[str, ...]  # the absolute names it may load


def module_name(relative: Path) -> str:
    """`fwemu/link/grpc.py` -> `fwemu.link.grpc`; a package's `__init__.py` is the package."""
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package(relative: Path) -> list[str]:
    """The package a module's relative imports start from."""
    parts = module_name(relative).split(".")
    return parts if relative.name == "__init__.py" else parts[:-1]


def _resolve(relative: Path, node: ast.ImportFrom) -> str | None:
    """The absolute module `from <node.module> import ...` names (None: past the top)."""
    if node.level == 0:
        return node.module or ""
    base = _package(relative)
    if node.level - 1 >= len(base):
        return None
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(root: Path, relative: Path) -> list[Import]:
    """Every import of the file `root / relative`, in source order."""
    source = (root / relative).read_text()
    return sorted(_imports(relative, source), key=lambda i: i.line)


def _imports(relative: Path, source: str) -> Iterator[Import]:
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source, str(relative))):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(relative, node)
            if base is None:
                continue
            # `from fwemu import model` loads fwemu.model: a name may be a submodule.
            modules = [base, *(f"{base}.{a.name}" if base else a.name for a in node.names)]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            modules = [node.args[0].value]
        else:
            continue
        statement = lines[node.lineno - 1].strip()
        yield Import(relative, node.lineno, statement, tuple(m for m in modules if m))


def within(module: str, names: tuple[str, ...]) -> str | None:
    """The name of `names` that `module` is or is inside of (None: none)."""
    for name in names:
        if module == name or module.startswith(name + "."):
            return name
    return None


def python_files(root: Path, folder: str) -> list[Path]:
    """The .py files below `root / folder`, relative to root, sorted."""
    return sorted(p.relative_to(root) for p in (root / folder).rglob("*.py"))


@dataclass(frozen=True)
class Rule:
    """No module below any folder of `under` imports any of `forbidden` (or a
    module inside one of them)."""

    name: str
    under: tuple[str, ...]
    forbidden: tuple[str, ...]
    why: str

    def violations(self, root: Path) -> list[str]:
        """One line per offending import: 'FILE:LINE: STATEMENT  (imports M, ...)'."""
        found = []
        for folder in self.under:
            for relative in python_files(root, folder):
                for imp in imports_of(root, relative):
                    hit = sorted({n for m in imp.modules if (n := within(m, self.forbidden))})
                    if hit:
                        found.append(
                            f"{imp.file.as_posix()}:{imp.line}: {imp.statement}"
                            f"  (imports {', '.join(hit)})"
                        )
        return found
