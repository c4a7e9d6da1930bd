"""Render a kustomization offline, for the features deploy/k8s uses: `resources`
(files and directories with their own kustomization), `namespace`, `labels` (on
the objects' metadata), `images` and JSON 6902 `patches` aimed at a kind and name.
Anything else in a kustomization is refused, so that the rendering never silently
differs from `kubectl kustomize` (tests/test_deploy.py compares the two where
kubectl is installed).

    python tools/kustomize.py deploy/k8s/overlays/production
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

Object = dict[str, Any]

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}


class Unsupported(Exception):
    """The kustomization uses something this renderer does not implement."""


def load_objects(path: Path) -> list[Object]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(directory: Path) -> list[Object]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise Unsupported(f"{directory}: unsupported kustomization fields {sorted(unknown)}")
    objects: list[Object] = []
    for entry in spec.get("resources", []):
        target = directory / entry
        objects += render(target) if target.is_dir() else load_objects(target)
    for label in spec.get("labels", []):
        if set(label) - {"pairs"}:
            raise Unsupported(f"{directory}: labels other than plain pairs")
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                if container["image"].split(":")[0] == image["name"]:
                    name = image.get("newName", image["name"])
                    container["image"] = f"{name}:{image['newTag']}" if "newTag" in image else name
    for patch in spec.get("patches", []):
        target = patch["target"]
        if set(target) - {"kind", "name"} or "path" in patch:
            raise Unsupported(f"{directory}: patches need an inline patch and kind/name")
        matched = [
            obj
            for obj in objects
            if obj["kind"] == target["kind"] and obj["metadata"]["name"] == target["name"]
        ]
        if not matched:
            raise Unsupported(f"{directory}: a patch matches nothing: {target}")
        for obj in matched:
            for op in yaml.safe_load(patch["patch"]):
                _apply(obj, op)
    return objects


def _containers(obj: Object) -> list[Object]:
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec", {})
    return list(pod.get("containers", [])) + list(pod.get("initContainers", []))


def _apply(obj: Object, op: Object) -> None:
    """One JSON 6902 operation: add, replace or remove at a JSON pointer."""
    *parents, last = [
        part.replace("~1", "/").replace("~0", "~") for part in op["path"].split("/")[1:]
    ]
    node: Any = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    kind = op["op"]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if kind == "add":
            node.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            node[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[index]
        else:
            raise Unsupported(f"JSON patch operation {kind}")
        return
    if kind in {"add", "replace"}:
        if kind == "replace" and last not in node:
            raise Unsupported(f"replace of a missing {op['path']}")
        node[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del node[last]
    else:
        raise Unsupported(f"JSON patch operation {kind}")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(yaml.safe_dump_all(render(Path(argv[0])), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
