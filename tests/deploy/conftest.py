"""Fixtures of the deployment tests: the kustomize overlays rendered once per session."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from tests.deploy.support import K8S, OVERLAYS, Doc, kustomize, load_yaml_documents

# Kinds that CustomResourceDefinitions bring (apiVersion, kind). kubernetes-validate has schemas for the built-in
# kinds only and would merely warn about these, so `Rendered.docs`/`.text` hold the built-in resources and
# `.custom` these; test_monitoring.py validates them against their own schema. Any other kind stays in `docs`,
# where the strict validation fails on it until it is listed here and validated.
CUSTOM_KINDS = frozenset({("monitoring.coreos.com/v1", "PrometheusRule")})


@dataclass(frozen=True)
class Rendered:
    """One overlay as `kubectl kustomize` renders it: the YAML text and parsed documents of its built-in resources,
    and its custom resources (CUSTOM_KINDS) apart."""

    name: str
    text: str
    docs: list[Doc]
    custom: list[Doc]

    def of_kind(self, kind: str) -> list[Doc]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> Doc:
        found = [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: expected one {kind} {name!r}, found {len(found)}"
        return found[0]

    def workloads(self) -> list[Doc]:
        return [d for d in self.docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def is_custom(doc: Doc) -> bool:
    return (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS


def split_rendered(name: str, text: str) -> Rendered:
    """Separates the custom resources from kustomize's output (documents split at its `---` lines, in order)."""
    docs = load_yaml_documents(text)
    parts = [part for part in re.split(r"(?m)^---\n", text) if part.strip()]
    assert len(parts) == len(docs), f"{name}: {len(parts)} YAML documents in the text, {len(docs)} parsed"
    builtin = [(part, doc) for part, doc in zip(parts, docs, strict=True) if not is_custom(doc)]
    return Rendered(
        name,
        "---\n".join(part for part, _ in builtin),
        [doc for _, doc in builtin],
        [doc for doc in docs if is_custom(doc)],
    )


@pytest.fixture(scope="session")
def rendered() -> dict[str, Rendered]:
    """Every overlay, rendered with the pinned kustomize (kubectl's)."""
    return {name: split_rendered(name, kustomize(K8S / "overlays" / name)) for name in OVERLAYS}
