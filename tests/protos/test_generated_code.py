"""The committed generated code matches the .proto files and loads on the runtimes we ship to."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")

from protos import generate
from protos.pdserve.v1 import generate_pb2_grpc, worker_pb2_grpc

# The GPU machine runs grpcio 1.84.x and protobuf 7.36.x; generated code must load there.
GPU_MACHINE_GRPCIO = (1, 84, 0)
GPU_MACHINE_PROTOBUF = (7, 36)


def test_committed_generated_code_matches_a_fresh_generation() -> None:
    assert generate.stale_files() == [], "run `python -m protos.generate` and commit the result"


def test_check_names_edited_missing_and_leftover_files(tmp_path: Path) -> None:
    copy_dir = tmp_path / generate.PROTO_SUBDIR
    shutil.copytree(generate.REPO_ROOT / generate.PROTO_SUBDIR, copy_dir, ignore=shutil.ignore_patterns("__pycache__"))
    (copy_dir / "worker_pb2.pyi").write_text("# edited by hand\n")
    (copy_dir / "common_pb2.py").unlink()
    (copy_dir / "removed_pb2.py").write_text("# generated from a deleted proto\n")

    assert generate.stale_files(tmp_path) == [
        "protos/pdserve/v1/common_pb2.py",
        "protos/pdserve/v1/removed_pb2.py",
        "protos/pdserve/v1/worker_pb2.pyi",
    ]
    assert generate.main(["--check"]) == 0  # the real tree is untouched

    generate.regenerate(tmp_path)
    assert generate.stale_files(tmp_path) == []


def test_only_files_with_services_get_grpc_modules() -> None:
    names = generate.generated_names(generate.REPO_ROOT / generate.PROTO_SUBDIR)
    assert {name for name in names if name.endswith("_grpc.py")} == {
        "generate_pb2_grpc.py",
        "registry_pb2_grpc.py",
        "worker_pb2_grpc.py",
    }


@pytest.mark.parametrize("module", [generate_pb2_grpc, worker_pb2_grpc], ids=lambda m: m.__name__)
def test_grpc_version_guard_accepts_grpcio_1_84(module) -> None:
    generated = tuple(int(part) for part in module.GRPC_GENERATED_VERSION.split("."))
    assert generated <= GPU_MACHINE_GRPCIO, module.GRPC_GENERATED_VERSION


@pytest.mark.parametrize("name", ["common_pb2.py", "generate_pb2.py", "worker_pb2.py"])
def test_protobuf_gencode_version_accepts_protobuf_7_36(name: str) -> None:
    text = (generate.REPO_ROOT / generate.PROTO_SUBDIR / name).read_text()
    match = re.search(r"^# Protobuf Python Version: (\d+)\.(\d+)\.\d+", text, re.MULTILINE)
    assert match is not None
    major, minor = int(match[1]), int(match[2])
    # The runtime refuses gencode of another major version or of a newer release than itself.
    assert major == GPU_MACHINE_PROTOBUF[0]
    assert (major, minor) <= GPU_MACHINE_PROTOBUF


def test_generated_modules_import_each_other_through_the_protos_package() -> None:
    text = (generate.REPO_ROOT / generate.PROTO_SUBDIR / "worker_pb2.py").read_text()
    assert "from protos.pdserve.v1 import common_pb2 as" in text
