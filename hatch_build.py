"""Build step: generate the gRPC/protobuf Python modules from proto/.

Runs for wheels, sdists and editable installs, so generated code is never
committed nor edited by hand.  The generator version is pinned in
pyproject.toml's build requirements.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def generate(root: Path) -> list[Path]:
    """Run protoc over every .proto under proto/, writing next to the packages."""
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
        f"--python_out={root}",
        f"--grpc_python_out={root}",
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
            f"--mypy_out={root}",
            f"--mypy_grpc_out={root}",
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
