#!/usr/bin/env python3
"""Validates the custom resources of manifests (cert-manager's Certificate, Issuer,
ClusterIssuer; prometheus-operator's ServiceMonitor), which kubernetes-validate has no schema
for, against their CRDs' schemas in this folder, as strictly as the API server's strict field
validation: a field the schema does not know is an error. Built-in kinds are kubernetes-validate's.

    validate.py FILE...   prints `ok KIND NAME` / `skip KIND NAME` per document; exit 1 on an error
"""
import json
import os
import sys

import jsonschema
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
# Kinds that live in a namespace: their objects must say which.
NAMESPACED = {"Certificate", "Issuer", "ServiceMonitor"}


def strict(node):
    """Closes every object schema that lists its properties and neither allows others nor
    preserves unknown fields (the API server prunes or, strictly, refuses those)."""
    if isinstance(node, dict):
        node = {k: strict(v) for k, v in node.items()}
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [strict(v) for v in node]
    return node


def schema_for(doc):
    api = doc.get("apiVersion", "")
    if "/" not in api:
        return None
    group, version = api.split("/", 1)
    path = os.path.join(HERE, f'{group}_{doc.get("kind", "")}_{version}.json'.lower())
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return strict(json.load(f))


def main():
    errors = 0
    for path in sys.argv[1:]:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        for doc in docs:
            kind = doc.get("kind", "?")
            meta = doc.get("metadata") or {}
            name = meta.get("name", "?")
            schema = schema_for(doc)
            if schema is None:
                print(f"skip {kind} {name}")
                continue
            problems = [
                f'{"/".join(str(p) for p in e.absolute_path) or "(root)"}: {e.message}'
                for e in jsonschema.Draft7Validator(schema).iter_errors(doc)
            ]
            if not meta.get("name"):
                problems.append("metadata.name: missing")
            if kind in NAMESPACED and not meta.get("namespace"):
                problems.append("metadata.namespace: missing")
            if "spec" not in doc:
                problems.append("spec: missing")
            for p in problems:
                print(f"ERROR {path}: {kind} {name}: {p}")
            errors += len(problems)
            if not problems:
                print(f"ok {kind} {name}")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
