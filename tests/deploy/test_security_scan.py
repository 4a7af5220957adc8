"""checkov over everything that gets deployed: the rendered dev and prod overlays and deploy/Dockerfile.

Findings are fixed, or waived in deploy/.checkov.yaml with a reason each. A deliberately insecure pod is
scanned in the same run, so the test also proves the scanner (and its configuration) still finds things.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.deploy.conftest import Rendered
from tests.deploy.support import DEPLOY, run, tool

CANARY = """\
apiVersion: v1
kind: Pod
metadata:
  name: canary
  namespace: canary
spec:
  containers:
    - name: canary
      image: busybox:1.37
      securityContext:
        privileged: true
"""
# What the canary must trip: privileged, no read-only root filesystem, privilege escalation, no resources.
CANARY_MUST_FAIL = {"CKV_K8S_16", "CKV_K8S_22", "CKV_K8S_20", "CKV_K8S_11"}


def failed_checks(report: Any) -> list[dict[str, Any]]:
    reports = report if isinstance(report, list) else [report]
    return [check for r in reports for check in r.get("results", {}).get("failed_checks", [])]


def test_checkov_finds_nothing_unwaived(rendered: dict[str, Rendered], tmp_path: Path) -> None:
    files = []
    for name, r in rendered.items():
        path = tmp_path / f"overlay-{name}.yaml"
        path.write_text(r.text, encoding="utf-8")
        files.append(path)
    canary = tmp_path / "canary.yaml"
    canary.write_text(CANARY, encoding="utf-8")

    args: list[str | Path] = [tool("checkov"), "--config-file", DEPLOY / ".checkov.yaml", "--output", "json"]
    for path in [*files, canary, DEPLOY / "Dockerfile"]:
        args += ["--file", path]
    done = run(args, timeout=300)
    assert done.stdout.strip(), f"checkov printed no report:\n{done.stderr}"
    report = json.loads(done.stdout)
    reports = report if isinstance(report, list) else [report]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}, done.stdout[:2000]
    for r in reports:
        assert r["summary"]["parsing_errors"] == 0, r["summary"]
    kubernetes = next(r for r in reports if r["check_type"] == "kubernetes")
    assert kubernetes["summary"]["resource_count"] >= sum(len(r.docs) for r in rendered.values())

    failures = failed_checks(report)
    ours = [f for f in failures if Path(f["file_path"]).name != canary.name]
    assert not ours, "checkov findings (fix them, or waive in deploy/.checkov.yaml with a reason):\n" + "\n".join(
        f"{f['check_id']} {f['check_name']}: {f['resource']} ({f['file_path']})" for f in ours
    )
    canary_failed = {f["check_id"] for f in failures if Path(f["file_path"]).name == canary.name}
    assert CANARY_MUST_FAIL <= canary_failed, f"checkov no longer catches an insecure pod: {sorted(canary_failed)}"


def test_every_waiver_has_a_reason() -> None:
    lines = (DEPLOY / ".checkov.yaml").read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        match = re.fullmatch(r"\s*-\s*(CKV\w+)\s*", line)
        if match:
            reason = []
            for previous in reversed(lines[:i]):
                if not previous.strip().startswith("#"):
                    break
                reason.append(previous)
            assert reason and match.group(1) in reason[-1], f"{match.group(1)} is waived without a reason above it"
