"""Build step: generate the gRPC/protobuf Python modules from proto/.

Runs for wheels, sdists and editable installs, so generated code is never
committed nor edited by hand.  The generator version is pinned in
pyproject.toml's build requirements.

Each proto package lives in the directory of its name (buf's
PACKAGE_DIRECTORY_MATCH): `vfio.v1` in proto/vfio/v1.  Its Python modules
live where the Python code has always imported them from (PYTHON_PACKAGES):
`vfio.v1` is generated into driver/api/v1, its imports rewritten to match.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

# proto package directory -> the Python package its modules go to (same when absent)
PYTHON_PACKAGES = {"vfio/v1": "driver/api/v1"}


def generate(root: Path) -> list[Path]:
    """Run protoc over every .proto under proto/, writing next to the packages."""
    with tempfile.TemporaryDirectory(prefix="protoc-") as out:
        protos = _protoc(root, Path(out))
        for src in sorted(Path(out).rglob("*_pb2*.py*")):
            rel = src.relative_to(out)
            pkg = PYTHON_PACKAGES.get(rel.parent.as_posix(), rel.parent.as_posix())
            dest = root / pkg / rel.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(_rewrite_imports(src.read_text()))
    return protos


def _rewrite_imports(code: str) -> str:
    """Imports of a moved package's modules, as they are after the move."""
    for proto_dir, pkg in PYTHON_PACKAGES.items():
        old, new = proto_dir.replace("/", "."), pkg.replace("/", ".")
        code = re.sub(rf"\b(from|import) {re.escape(old)}\b", rf"\1 {new}", code)
    return code


def _protoc(root: Path, out: Path) -> list[Path]:
    """Run protoc over every .proto under proto/, writing into `out`."""
    from grpc_tools import protoc  # build requirement

    proto_root = root / "proto"
    protos = sorted(proto_root.rglob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {proto_root}")
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
    ]
    bindir = Path(sys.executable).parent
    mypy_plugin = shutil.which("protoc-gen-mypy", path=str(bindir)) or shutil.which(
        "protoc-gen-mypy"
    )
    mypy_grpc_plugin = shutil.which("protoc-gen-mypy_grpc", path=str(bindir)) or shutil.which(
        "protoc-gen-mypy_grpc"
    )
    if mypy_plugin and mypy_grpc_plugin:
        args += [
            f"--plugin=protoc-gen-mypy={mypy_plugin}",
            f"--plugin=protoc-gen-mypy_grpc={mypy_grpc_plugin}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
        ]
    args += [str(p) for p in protos]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    return protos


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        generate(Path(self.root))


if __name__ == "__main__":
    os.chdir(Path(__file__).parent)
    for p in generate(Path.cwd()):
        print(f"generated from {p}")
