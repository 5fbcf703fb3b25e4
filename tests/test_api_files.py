"""The API files a client in another language needs: the proto packages in
directories of their names, and the vendored google.rpc protos describing the
very messages the services send in `grpc-status-details-bin`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
VENDORED = ROOT / "third_party" / "googleapis"


def compiled(tmp_path: Path, root: Path, files: list[str]) -> descriptor_pb2.FileDescriptorSet:
    include = Path(protoc.__file__).parent / "_proto"
    out = tmp_path / "set.binpb"
    rc = protoc.main(["protoc", f"-I{root}", f"-I{include}", f"--descriptor_set_out={out}", *files])
    assert rc == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def fields(message: descriptor_pb2.DescriptorProto) -> list[tuple[str, int, int, int, str]]:
    return [(f.name, f.number, f.type, f.label, f.type_name) for f in message.field]


@pytest.mark.parametrize("path", sorted((ROOT / "proto").rglob("*.proto")), ids=str)
def test_each_proto_package_is_in_the_directory_of_its_name(path: Path) -> None:
    m = re.search(r"^package ([\w.]+);", path.read_text(), re.M)
    assert m is not None, f"{path}: no package"
    rel = path.parent.relative_to(ROOT / "proto").as_posix()
    assert rel == m.group(1).replace(".", "/")


@pytest.mark.parametrize(
    ("name", "module"),
    [("status", status_pb2), ("error_details", error_details_pb2), ("code", code_pb2)],
)
def test_the_vendored_google_rpc_protos_describe_what_the_services_send(
    tmp_path: Path, name: str, module: object
) -> None:
    (vendored,) = compiled(tmp_path, VENDORED, [f"google/rpc/{name}.proto"]).file
    ours = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(ours)  # type: ignore[attr-defined]
    assert vendored.package == ours.package == "google.rpc"
    assert {m.name: fields(m) for m in vendored.message_type} == {
        m.name: fields(m) for m in ours.message_type
    }
    assert {e.name: [(v.name, v.number) for v in e.value] for e in vendored.enum_type} == {
        e.name: [(v.name, v.number) for v in e.value] for e in ours.enum_type
    }
