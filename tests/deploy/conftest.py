"""Fixtures of the deployment tests: the kustomize overlays rendered once per session."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.deploy.support import K8S, OVERLAYS, Doc, kustomize, load_yaml_documents


@dataclass(frozen=True)
class Rendered:
    """One overlay as `kubectl kustomize` renders it: the YAML text and its parsed documents."""

    name: str
    text: str
    docs: list[Doc]

    def of_kind(self, kind: str) -> list[Doc]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> Doc:
        found = [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: expected one {kind} {name!r}, found {len(found)}"
        return found[0]

    def workloads(self) -> list[Doc]:
        return [d for d in self.docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]


@pytest.fixture(scope="session")
def rendered() -> dict[str, Rendered]:
    """Every overlay, rendered with the pinned kustomize (kubectl's)."""
    result: dict[str, Rendered] = {}
    for name in OVERLAYS:
        text = kustomize(K8S / "overlays" / name)
        result[name] = Rendered(name, text, load_yaml_documents(text))
    return result
