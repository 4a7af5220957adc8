"""The committed generated code matches the .proto sources, and the protos are clean under `buf lint`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _generated_files(base: Path) -> dict[str, str]:
    return {
        str(path.relative_to(base)): path.read_text(encoding="utf-8")
        for path in sorted(base.rglob("*"))
        if path.name.endswith(GENERATED_SUFFIXES)
    }


def test_generated_python_is_fresh(tmp_path: Path) -> None:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}",
            f"--python_out={tmp_path}", f"--mypy_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", f"--mypy_grpc_out={tmp_path}",
            f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            *sources,
        ],
        capture_output=True, text=True, cwd=PROTOS, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    fresh = _generated_files(tmp_path)
    committed = _generated_files(PROTOS)
    assert fresh.keys() == committed.keys(), "generated files differ in name: run `make protos`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"generated code is stale for {stale}: run `make protos` and commit the result"


def test_buf_lint_is_clean() -> None:
    buf = ROOT / "node_modules" / ".bin" / "buf"
    if not buf.exists():
        found = shutil.which("buf")
        assert found, "buf is not installed: run `make venv` (npm install of @bufbuild/buf)"
        buf = Path(found)
    result = subprocess.run([str(buf), "lint"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, f"buf lint found problems:\n{result.stdout}{result.stderr}"
