"""The architecture's import rules (issue 15), held against the source.

The driver sees the firmware only through the link (fwemu.link: the
interface `ifc`, `base`, the adapters), fwemu.hostmem and the embedded mode's
composition root fwemu.embedded: never the model, its gRPC face or its
scenario files.  Interfaces point down: the link knows nothing behind it, the
firmware nothing of the driver, clients import no server module, grpcsvc is
below the services, and nothing production imports the tests or benchmarks.
The pure cores (the device model, the VFIO core, mlx5vf) carry no gRPC.

Read from every module's source (imports inside functions and under
TYPE_CHECKING count), and checked again by importing the entry points in a
fresh interpreter.  Each rule is also shown to catch a violation of its own in
a made-up tree, so that none can pass by looking at nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.imports import Rule, imports_of, module_name, python_files

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fwemu", "driver", "vfioclient", "grpcsvc")
MAX_LINES = 600
GRPC = ("grpc", "grpc_health", "grpc_reflection", "grpc_status")
BEHIND_THE_LINK = ("fwemu.model", "fwemu.service", "fwemu.scenario")

RULES = [
    Rule(
        "driver-sees-the-firmware-through-its-link",
        ("driver",),
        BEHIND_THE_LINK,
        "the driver reaches the firmware through fwemu.link, fwemu.hostmem and fwemu.embedded",
    ),
    Rule(
        "the-link-knows-nothing-behind-it",
        ("fwemu/link",),
        (*BEHIND_THE_LINK, "driver", "vfioclient"),
        "the link is the firmware's interface (mlx5_ifc.h) and its adapters",
    ),
    Rule(
        "clients-import-no-server-module",
        ("vfioclient",),
        ("fwemu.model", "fwemu.service", "driver.service", "driver.events"),
        "a client uses the APIs (driver.api.*, driver.shards, driver.vfio.uapi, fwemu.link)",
    ),
    Rule(
        "the-firmware-knows-no-driver",
        ("fwemu",),
        ("driver", "vfioclient"),
        "the firmware is below the driver and its clients",
    ),
    Rule(
        "grpcsvc-is-below-the-services",
        ("grpcsvc",),
        ("fwemu", "driver", "vfioclient"),
        "grpcsvc is the plumbing every service shares",
    ),
    Rule(
        "production-imports-no-tests",
        PACKAGES,
        ("tests", "benchmarks"),
        "tests and benchmarks use the packages, never the other way",
    ),
    Rule(
        "pure-cores-have-no-grpc",
        ("fwemu/model", "driver/vfio", "driver/mlx5"),
        GRPC,
        "the device model and the driver's cores are plain objects; gRPC is their adapters' job",
    ),
]

# Entry points of the driver and the client, and what importing them must not load.
ENTRY_POINTS = ["driver.mlx5.main", "driver.registry", "driver.service.servicer", "vfioclient"]
NOT_LOADED = ("fwemu.model", "fwemu.service")
PURE_CORES = ("fwemu/model", "driver/vfio", "driver/mlx5")


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_import_rule(rule: Rule) -> None:
    found = rule.violations(ROOT)
    if found:
        pytest.fail(
            f"{rule.name}: no module under {', '.join(rule.under)} may import "
            f"{', '.join(rule.forbidden)} ({rule.why}):\n  " + "\n  ".join(found),
            pytrace=False,
        )


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_rule_looks_at_modules(rule: Rule) -> None:
    """A folder that moved or emptied would make its rule pass on nothing."""
    for folder in rule.under:
        assert python_files(ROOT, folder), f"{rule.name}: no modules under {folder}/"


def _violating_sources(folder: str, forbidden: str) -> dict[str, str]:
    """Modules under `folder` importing `forbidden` in every way a module can."""
    out = {
        "plain.py": f"import {forbidden}\n",
        "aliased.py": f"import os, {forbidden} as m\n",
        "from_module.py": f"from {forbidden} import thing\n",
        "in_function.py": f"def f() -> None:\n    from {forbidden} import thing\n",
        "type_checking.py": (
            f"from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    import {forbidden}\n"
        ),
        "by_name.py": f"import importlib\n\nimportlib.import_module({forbidden!r})\n",
    }
    parent, _, last = forbidden.rpartition(".")
    if parent:
        out["submodule_by_from.py"] = f"from {parent} import {last}\n"
    package, target = folder.split("/"), forbidden.split(".")
    common = next(
        (i for i, (a, b) in enumerate(zip(package, target, strict=False)) if a != b),
        min(len(package), len(target)),
    )
    if common and target[common:]:  # reachable by a relative import
        dots = "." * (len(package) - common + 1)
        out["relative.py"] = f"from {dots}{'.'.join(target[common:])} import thing\n"
        out["relative_parent.py"] = f"from {dots} import {target[common]}\n"
    return out


# Every (rule, folder, forbidden module): each shown to be caught.
CASES = [(rule, folder, name) for rule in RULES for folder in rule.under for name in rule.forbidden]


@pytest.mark.parametrize(
    ("rule", "folder", "forbidden"), CASES, ids=[f"{r.name}:{f}:{n}" for r, f, n in CASES]
)
def test_rule_catches_every_form_of_import(
    rule: Rule, folder: str, forbidden: str, tmp_path: Path
) -> None:
    sources = _violating_sources(folder, forbidden)
    (tmp_path / folder).mkdir(parents=True)
    for name, text in sources.items():
        (tmp_path / folder / name).write_text(text)
    (tmp_path / folder / "clean.py").write_text("import os\nfrom . import clean\n")
    found = rule.violations(tmp_path)
    flagged = {line.split(":", 1)[0].rsplit("/", 1)[1] for line in found}
    assert flagged == set(sources), found
    assert all(f"(imports {forbidden})" in line for line in found), found


def test_a_violation_names_file_line_and_statement(tmp_path: Path) -> None:
    (tmp_path / "fwemu" / "link").mkdir(parents=True)
    (tmp_path / "fwemu" / "link" / "inproc.py").write_text(
        '"""doc"""\n\nfrom ..model.firmware import Firmware\n'
    )
    (rule,) = [r for r in RULES if r.name == "the-link-knows-nothing-behind-it"]
    assert rule.violations(tmp_path) == [
        "fwemu/link/inproc.py:3: from ..model.firmware import Firmware  (imports fwemu.model)"
    ]


def test_relative_imports_resolve_from_the_package(tmp_path: Path) -> None:
    (tmp_path / "driver" / "service").mkdir(parents=True)
    (tmp_path / "driver" / "service" / "__init__.py").write_text("from .. import events\n")
    (tmp_path / "driver" / "service" / "server.py").write_text("from ..events import Bus\n")
    got = {
        m
        for f in ("__init__.py", "server.py")
        for i in imports_of(tmp_path, Path("driver/service", f))
        for m in i.modules
    }
    assert got == {"driver", "driver.events", "driver.events.Bus"}


def _loaded_by_import(
    modules: list[str], watched: tuple[str, ...], root: Path = ROOT
) -> dict[str, str]:
    """Import `modules` in a fresh interpreter in `root`: {watched module
    loaded: the FILE:LINE whose import loaded it}.  An import that fails fails
    the test."""
    probe = r"""
import importlib, json, sys, traceback
watched = tuple(json.loads(sys.argv[1]))
first = {}
class Watch:
    def find_spec(self, name, path=None, target=None):
        if any(name == w or name.startswith(w + ".") for w in watched):
            frames = [f for f in traceback.extract_stack() if not f.filename.startswith("<")]
            first.setdefault(name, f"{frames[-1].filename}:{frames[-1].lineno}")
        return None
sys.meta_path.insert(0, Watch())
for m in sys.argv[2:]:
    importlib.import_module(m)
print(json.dumps(first))
"""
    done = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(watched), *modules],
        capture_output=True, text=True, cwd=root, timeout=60, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.fail(f"importing {', '.join(modules)} failed:\n{done.stderr}", pytrace=False)
    where: dict[str, str] = json.loads(done.stdout)
    return {m: w.replace(f"{root}/", "") for m, w in where.items()}


def _report(loaded: dict[str, str]) -> str:
    return "\n  ".join(f"{m} (imported at {w})" for m, w in sorted(loaded.items()))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_the_driver_and_client_load_no_firmware_internals(entry: str) -> None:
    loaded = _loaded_by_import([entry], NOT_LOADED)
    if loaded:
        pytest.fail(f"importing {entry} loads:\n  {_report(loaded)}", pytrace=False)


@pytest.mark.parametrize("core", PURE_CORES)
def test_the_pure_cores_load_no_grpc(core: str) -> None:
    modules = [module_name(p) for p in python_files(ROOT, core)]
    loaded = _loaded_by_import(modules, GRPC)
    top = {m: w for m, w in loaded.items() if "." not in m}  # where each gRPC package came in
    if top:
        pytest.fail(f"importing {core}/ loads gRPC:\n  {_report(top)}", pytrace=False)


def test_the_probe_names_the_import_that_loaded_a_module(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("import json\n\nfrom . import b\n")
    (tmp_path / "pkg" / "b.py").write_text('"""b"""\n\n\ndef f() -> None: ...\n\n\nimport pkg.c\n')
    (tmp_path / "pkg" / "c.py").write_text("")
    loaded = _loaded_by_import(["pkg.a"], ("pkg.b", "pkg.c"), tmp_path)
    assert loaded == {"pkg.b": "pkg/a.py:3", "pkg.c": "pkg/b.py:7"}


def test_no_package_module_is_over_600_lines() -> None:
    long = [
        f"{p.as_posix()}: {n} lines"
        for package in PACKAGES
        for p in python_files(ROOT, package)
        if "_pb2" not in p.name and (n := len((ROOT / p).read_text().splitlines())) > MAX_LINES
    ]
    if long:
        pytest.fail(
            f"modules over {MAX_LINES} lines (split them by concept):\n  " + "\n  ".join(long),
            pytrace=False,
        )
