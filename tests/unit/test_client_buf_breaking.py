"""`buf breaking` guards the released API (protos/baseline/) against incompatible proto changes."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "node_modules" / ".bin" / "buf"
BASELINE = ROOT / "protos" / "baseline" / "cqrs-orders-v1.binpb"


async def _buf_breaking(workdir: Path) -> tuple[int, str]:
    """Runs `buf breaking protos --against <baseline>` from `workdir` (which has buf.yaml v2 at its root)."""
    process = await asyncio.create_subprocess_exec(
        str(BUF), "breaking", "protos", "--against", str(BASELINE), "--error-format", "text",
        cwd=workdir, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    return process.returncode or 0, output.decode()


def _copy_workspace(target: Path) -> None:
    shutil.copy(ROOT / "buf.yaml", target / "buf.yaml")
    for proto in (ROOT / "protos").rglob("*.proto"):
        destination = target / proto.relative_to(ROOT)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(proto, destination)


def test_baseline_is_committed() -> None:
    assert BUF.exists(), "node_modules/.bin/buf is missing: run `npm ci`"
    assert BASELINE.stat().st_size > 0


async def test_current_protos_are_compatible_with_the_released_api() -> None:
    code, output = await _buf_breaking(ROOT)
    assert code == 0, f"breaking change against {BASELINE.name} (see protos/README.md):\n{output}"


async def test_a_deleted_field_is_caught(tmp_path: Path) -> None:
    _copy_workspace(tmp_path)
    order_proto = tmp_path / "protos" / "cqrs" / "orders" / "v1" / "order.proto"
    text = order_proto.read_text()
    assert "  string cancel_reason = 8;\n" in text
    order_proto.write_text(text.replace("  string cancel_reason = 8;\n", ""))

    code, output = await _buf_breaking(tmp_path)
    assert code != 0, output
    assert "cancel_reason" in output or "8" in output, output


async def test_a_renumbered_field_is_caught(tmp_path: Path) -> None:
    _copy_workspace(tmp_path)
    service_proto = tmp_path / "protos" / "cqrs" / "orders" / "v1" / "query_service.proto"
    text = service_proto.read_text()
    service_proto.write_text(text.replace("string consistency_token = 2;", "string consistency_token = 3;"))

    code, output = await _buf_breaking(tmp_path)
    assert code != 0, output
