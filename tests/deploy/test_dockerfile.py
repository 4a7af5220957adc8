"""The container image definition (deploy/Dockerfile, .dockerignore, deploy/image-requirements.txt).

No Docker engine runs here, so the image is checked without building it: hadolint lints the Dockerfile; its
structure is checked (pinned base, non-root user, nothing but the venv copied into the final stage, entry point);
the build context that .dockerignore lets through is assembled and `pip wheel` builds the project from exactly
that, as the builder stage does; and the pinned dependency set is checked for completeness against the installed
metadata, the way the builder's `pip install --no-deps` + `pip check` will.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import shutil
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from setuptools import find_packages

from tests.deploy.support import DEPLOY, ROOT, all_env_read, run, tool

DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SERVICE_PORTS = {"command_service": 50051, "query_service": 50052}
METRICS_PORTS = {"command_service": 9101, "projector": 9102, "query_service": 9103}
BASE_IMAGE = re.compile(r"^python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}$")


@dataclass
class Stage:
    image: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(path: Path = DOCKERFILE) -> list[Stage]:
    """Stages of the Dockerfile: (instruction, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            stages.append(Stage(image=parts[0], name=parts[2] if len(parts) > 2 else ""))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def lock_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lock_image_requirements", DEPLOY / "lock_image_requirements.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- lint --------------------------------------------------------------------------------------------------------


def test_hadolint_is_clean() -> None:
    done = run([tool("hadolint"), "--config", DEPLOY / ".hadolint.yaml", "--no-color", DOCKERFILE])
    assert done.returncode == 0, (
        f"hadolint findings (fix them, or waive in deploy/.hadolint.yaml with a reason):\n{done.stdout}{done.stderr}"
    )


def test_hadolint_config_waives_nothing_silently() -> None:
    config = (DEPLOY / ".hadolint.yaml").read_text(encoding="utf-8")
    assert "failure-threshold: style" in config and "disable-ignore-pragma: true" in config
    assert "hadolint ignore" not in DOCKERFILE.read_text(encoding="utf-8")


# --- structure ---------------------------------------------------------------------------------------------------


def test_both_stages_use_the_same_base_pinned_by_tag_and_digest() -> None:
    stages = parse_dockerfile()
    assert [s.name for s in stages] == ["builder", "runtime"]
    images = {s.image for s in stages}
    assert len(images) == 1, f"builder and runtime must share one base (the venv links to its python): {images}"
    (image,) = images
    assert BASE_IMAGE.match(image), f"base must be python:3.11.x-slim-bookworm@sha256:<digest>, got {image}"


def test_final_stage_runs_unprivileged_and_copies_only_the_venv() -> None:
    runtime = parse_dockerfile()[-1]
    (user,) = runtime.all("USER")
    uid_arg = dict(a.split("=", 1) for a in runtime.all("ARG"))["UID"]
    uid = user.split(":")[0].replace("${UID}", uid_arg)
    assert uid.isdigit() and int(uid) >= 10000, f"USER must be a fixed numeric non-root UID, got {user}"
    keywords = [kw for kw, _ in runtime.instructions]
    assert keywords.index("USER") > keywords.index("COPY"), "USER comes after the files are in place"
    assert runtime.all("COPY") == ["--from=builder /opt/venv /opt/venv"], "only the finished venv enters the image"
    for command in runtime.all("RUN"):
        assert "apt-get install" not in command and "pip install" not in command, command
    env = " ".join(runtime.all("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env


def test_entry_point_runs_any_service_or_the_cli() -> None:
    runtime = parse_dockerfile()[-1]
    assert runtime.all("ENTRYPOINT") == ['["python", "-m"]']
    assert runtime.all("CMD") == ['["command_service"]']
    # Every module the manifests and compose file run must be runnable with `python -m`.
    for module in ("command_service", "query_service", "projector", "cqrsctl.main"):
        spec = importlib.util.find_spec(module)
        assert spec is not None, module
        if spec.submodule_search_locations:  # a package: needs __main__
            assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{module} has no __main__"
    cli = (ROOT / "cqrsctl" / "main.py").read_text(encoding="utf-8")
    assert 'if __name__ == "__main__":' in cli, "`python -m cqrsctl.main` must run the CLI"


def test_exposed_ports_and_preset_variables_match_the_code() -> None:
    runtime = parse_dockerfile()[-1]
    exposed = {int(p) for args in runtime.all("EXPOSE") for p in args.split()}
    assert exposed == set(SERVICE_PORTS.values()) | set(METRICS_PORTS.values())
    env = " ".join(runtime.all("ENV"))
    preset = set(re.findall(r"\b(CQRS_[A-Z0-9_]+)=", env))
    assert preset <= all_env_read(), f"variables no service reads: {preset - all_env_read()}"
    assert "CQRS_COMMAND_LISTEN=0.0.0.0:50051" in env and "CQRS_QUERY_LISTEN=0.0.0.0:50052" in env


# --- build context and packaging ---------------------------------------------------------------------------------


def dockerignore_allowlist() -> tuple[list[str], list[str]]:
    """(allowed top-level paths, excluded glob patterns) of the allow-list .dockerignore."""
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore must start by excluding everything (an allow-list)"
    allowed = [line[1:].rstrip("/") for line in lines[1:] if line.startswith("!")]
    excluded = [line for line in lines[1:] if not line.startswith("!")]
    assert all(p.startswith("**/") for p in excluded), f"after the allow-list only **/ exclusions: {excluded}"
    return allowed, excluded


def assemble_context(dest: Path) -> Path:
    """Copies what the .dockerignore lets into the build context (the way `docker build` would) into `dest`."""
    allowed, excluded = dockerignore_allowlist()
    names = [p.removeprefix("**/") for p in excluded]

    def ignore(directory: str, entries: list[str]) -> set[str]:
        return {e for e in entries if any(fnmatch.fnmatch(e, n) for n in names)}

    for path in allowed:
        source = ROOT / path
        assert source.exists(), f".dockerignore allows {path}, which does not exist"
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=ignore)
        else:
            shutil.copy2(source, target)
    return dest


def test_build_context_holds_every_package_the_project_installs() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    find = config["tool"]["setuptools"]["packages"]["find"]
    allowed, _ = dockerignore_allowlist()
    for where in find["where"]:
        for package in find_packages(where=str(ROOT / where), include=find["include"]):
            top = (Path(where) / package.split(".")[0]).as_posix().removeprefix("./")
            assert any(top == a or top.startswith(a + "/") for a in allowed), (
                f"package {package} (from {where}/) is installed by pyproject.toml but .dockerignore excludes {top}/"
            )
    for needed in ("pyproject.toml", "README.md", "deploy/image-requirements.txt"):
        assert needed in allowed, needed
    copied = [args for stage in parse_dockerfile() for args in stage.all("COPY") if "--from" not in args]
    for args in copied:
        source = args.split()[0]
        assert source == "." or source in allowed, f"COPY {source} is not in the build context"


def test_the_build_context_builds_a_wheel_with_every_entry_point(tmp_path: Path) -> None:
    """What the builder stage does with the context (`pip install --no-deps --no-build-isolation .`)."""
    context = assemble_context(tmp_path / "context")
    done = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            tmp_path / "dist",
            context,
        ],
        timeout=180,
    )
    assert done.returncode == 0, f"building the project from the Docker build context failed:\n{done.stderr}"
    (wheel,) = (tmp_path / "dist").glob("cqrs_orders-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "command_service/__main__.py",
        "query_service/__main__.py",
        "projector/__main__.py",
        "cqrsctl/main.py",
    ):
        assert module in names, f"{module} missing from the wheel built from the Docker context"
    assert any(n.startswith("command_service/migrations/") and n.endswith(".sql") for n in names), "migrations"
    assert any(re.match(r"cqrs/orders/v1/.+_pb2_grpc\.py$", n) for n in names), "generated gRPC code"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "cqrs = cqrsctl.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# --- pinned dependencies -----------------------------------------------------------------------------------------


def test_image_requirements_pin_every_runtime_dependency() -> None:
    lock = lock_module()
    pins = lock.read_lock()
    hint = "run `make image-lock` (deploy/lock_image_requirements.py) and commit deploy/image-requirements.txt"
    for requirement in lock.direct_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is a runtime dependency but not pinned for the image; {hint}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"the image pins {name}=={pins[name]}, which does not satisfy {requirement}; {hint}"
        )
    expected = lock.closure(lock.direct_requirements())
    missing = sorted(set(expected) - set(pins))
    assert not missing, f"transitive dependencies missing from the image pins: {missing}; {hint}"
    unused = sorted(set(pins) - set(expected))
    assert not unused, f"pins nothing needs: {unused}; {hint}"


def test_image_pins_are_mutually_consistent() -> None:
    """What the builder's `pip check` will verify: each pinned package's requirements accept the other pins.

    Read from the installed metadata, for the pins whose version is the one installed in this environment.
    """
    lock = lock_module()
    pins = lock.read_lock()
    checked = 0
    for name, version in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        checked += 1
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            child = canonicalize_name(requirement.name)
            assert child in pins, f"{name}=={version} needs {requirement}, which is not pinned"
            assert requirement.specifier.contains(pins[child], prereleases=True), (
                f"{name}=={version} needs {requirement}, but the image pins {child}=={pins[child]}"
            )
    assert checked >= len(pins) // 2, "the environment differs too much from the pins to check them; make image-lock"


def test_every_pin_exists_as_a_published_wheel() -> None:
    """The builder installs with --only-binary=:all: and has no compiler: each pin must come as a wheel.

    Checked on the installed copies: a distribution pip built locally from an sdist carries a plain
    `linux_<arch>` tag, one installed from a published wheel a manylinux/musllinux or `none-any` tag.
    (This machine is amd64; arm64 wheels are not checked.)
    """
    pins = lock_module().read_lock()
    local_builds = []
    for name, version in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        wheel_file = dist.read_text("WHEEL") or ""
        tags = [line.split(":", 1)[1].strip() for line in wheel_file.splitlines() if line.startswith("Tag:")]
        if not any(t.endswith("-any") or "manylinux" in t or "musllinux" in t for t in tags):
            local_builds.append(f"{name}=={version} ({', '.join(tags) or 'no WHEEL tags'})")
    assert not local_builds, f"no published wheel, the image build would need a compiler: {local_builds}"


def test_image_build_backend_pin_satisfies_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    requires = {canonicalize_name(Requirement(r).name): Requirement(r) for r in config["build-system"]["requires"]}
    pinned = re.search(r"setuptools==([\w.]+)", DOCKERFILE.read_text(encoding="utf-8"))
    assert pinned, "the builder pins setuptools (it builds without isolation)"
    assert requires[canonicalize_name("setuptools")].specifier.contains(pinned.group(1))
    # setuptools >= 70.1 builds wheels itself; the `wheel` build requirement is then met without the package.
    major, minor = (int(x) for x in pinned.group(1).split(".")[:2])
    assert (major, minor) >= (70, 1)
    # Installed in the same pip call as the lock: the two pins must not disagree.
    locked = lock_module().read_lock().get("setuptools")
    assert locked in (None, pinned.group(1)), f"Dockerfile pins setuptools=={pinned.group(1)}, the lock {locked}"
