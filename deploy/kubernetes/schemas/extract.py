#!/usr/bin/env python3
"""Extracts the OpenAPI v3 schema of each served version of CustomResourceDefinitions, without
their descriptions, into GROUP_KIND_VERSION.json here (README.md in this folder).

    extract.py cert-manager.io_certificates.yaml monitoring.coreos.com_servicemonitors.yaml ...
"""
import json
import os
import sys

import yaml


def strip(node):
    """The schema without `description` texts (most of a CRD's size, none of its rules)."""
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    for path in sys.argv[1:]:
        with open(path) as f:
            crd = yaml.safe_load(f)
        spec = crd["spec"]
        for version in spec["versions"]:
            if not version.get("served"):
                continue
            name = f'{spec["group"]}_{spec["names"]["kind"]}_{version["name"]}.json'.lower()
            with open(os.path.join(here, name), "w") as out:
                json.dump(strip(version["schema"]["openAPIV3Schema"]), out, indent=1, sort_keys=True)
                out.write("\n")
            print(name)


if __name__ == "__main__":
    main()
