"""Strict validation of Kubernetes objects against the real schemas in ../shared/crds (a test helper).

Plain CRD schemas never set additionalProperties: false, so a typo such as `comand` or `storageURI` passes
`kubectl apply --dry-run`-style validation and is silently dropped by the API server. Here every object schema
that lists `properties` rejects keys it does not list (unless it says x-kubernetes-preserve-unknown-fields), for
the CRDs, for Katib's OpenAPI document (its CRDs carry no schema at all) and, through kubernetes-validate's
strict mode, for core objects at a pinned Kubernetes version.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CRDS = SHARED / "crds"
KUBERNETES_VERSION = "1.33.0"
KATIB_SWAGGER = "katib_v1beta1_swagger.json"
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
KATIB_TYPES = {"Experiment": "v1beta1.Experiment", "Trial": ".v1beta1.Trial", "Suggestion": ".v1beta1.Suggestion"}


def strict(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema in which unlisted keys are errors and `nullable` allows null."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k in ("properties", "items", "additionalProperties", "allOf", "anyOf", "oneOf",
                                  "not", "schemas") else v for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
    if "schemas" in out:
        out["schemas"] = {k: strict(v) for k, v in schema["schemas"].items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _where(error: jsonschema.ValidationError) -> str:
    return "/".join(str(p) for p in error.absolute_path) or "<root>"


class Validator:
    """Validates any object bincount renders; an object nothing here knows is an error, never a pass."""

    def __init__(self, crds: Path = CRDS):
        self.crds = crds

    @cached_property
    def _crd_schemas(self) -> dict[tuple[str, str], dict[str, Any]]:
        out = {}
        for path in sorted(self.crds.glob("*.yaml")):
            crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = version.get("schema", {}).get("openAPIV3Schema", {})
                if "properties" in schema:
                    out[(f"{group}/{version['name']}", kind)] = strict(schema)
        return out

    @cached_property
    def _katib(self) -> dict[str, Any]:
        doc = json.loads((self.crds / KATIB_SWAGGER).read_text())
        return {"components": strict(doc["components"])}

    def _katib_errors(self, obj: Any, type_name: str) -> list[str]:
        schema = {**self._katib, "$ref": f"#/components/schemas/{type_name}"}
        validator = jsonschema.Draft7Validator(schema)
        return [f"{_where(e)}: {e.message}" for e in validator.iter_errors(obj)]

    def errors(self, obj: dict[str, Any]) -> list[str]:
        """Every schema violation of `obj`, as 'path: message' lines (empty when valid)."""
        api, kind = obj.get("apiVersion", ""), obj.get("kind", "")
        name = f"{kind} {obj.get('metadata', {}).get('name', '?')}"
        if api == "kubeflow.org/v1beta1" and kind in KATIB_TYPES:
            found = self._katib_errors(obj, KATIB_TYPES[kind])
            trial = obj.get("spec", {}).get("trialTemplate", {}).get("trialSpec")
            if isinstance(trial, dict):
                found += [f"spec/trialTemplate/trialSpec/{e}" for e in self._crd_errors(trial, metadata=False)]
        elif (api, kind) in self._crd_schemas:
            found = self._crd_errors(obj, metadata=True)
        else:
            found = self._core_errors(obj)
        return [f"{name}: {e}" for e in found]

    def _crd_errors(self, obj: dict[str, Any], metadata: bool) -> list[str]:
        key = (obj.get("apiVersion", ""), obj.get("kind", ""))
        schema = self._crd_schemas.get(key)
        if schema is None:
            return [f"no CRD schema for {key[0]} {key[1]} in {self.crds}"]
        found = [f"{_where(e)}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(obj)]
        if metadata:
            found += [f"metadata/{e}" for e in self._katib_errors(obj.get("metadata", {}), OBJECT_META)]
        return found

    @staticmethod
    def _core_errors(obj: dict[str, Any]) -> list[str]:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            return [f"{'/'.join(str(p) for p in e.path) or '<root>'}: {e.message}"]
        except kubernetes_validate.SchemaNotFoundError as e:
            return [f"no Kubernetes {KUBERNETES_VERSION} schema: {e}"]
        return []
