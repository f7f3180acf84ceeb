"""Pod volumes as host folders, and the bind mounts that place them at each container's mountPath.

emptyDir is a per-pod folder; hostPath is the host path; a PersistentVolumeClaim resolves to its
bound PersistentVolume's hostPath or local path; secret, configMap, downwardAPI and projected
volumes (including ServiceAccount tokens from the TokenRequest API, so in-cluster config works) are
written once as files when the pod starts (later updates to the sources are not propagated).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .kubeapi import ApiError, KubeApi
from .podenv import ConfigError, configmap_data, field_ref, secret_data

Obj = dict[str, Any]


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool

    def to_json(self) -> Obj:
        return {"source": self.source, "target": self.target, "readOnly": self.read_only}


class VolumeManager:
    def __init__(self, api: KubeApi, pod: Obj, pod_dir: str) -> None:
        self.api = api
        self.pod = pod
        self.ns = pod["metadata"]["namespace"]
        self.pod_dir = pod_dir
        self.paths: dict[str, str] = {}

    def prepare(self) -> None:
        """Materialises every volume of the pod; raises ConfigError while one cannot be yet
        (missing Secret, unbound claim...), which the caller retries."""
        for vol in self.pod["spec"].get("volumes") or []:
            name = vol["name"]
            if name not in self.paths:
                self.paths[name] = self._prepare(vol)

    def mounts(self, container: Obj) -> list[Mount]:
        out = []
        for vm in container.get("volumeMounts") or []:
            src = self.paths.get(vm["name"])
            if src is None:
                raise ConfigError(f"volume {vm['name']!r} is not defined in the pod")
            if vm.get("subPath"):
                src = os.path.join(src, vm["subPath"])
                if not os.path.exists(src):
                    os.makedirs(src, exist_ok=True)
            out.append(Mount(source=src, target=vm["mountPath"], read_only=bool(vm.get("readOnly"))))
        return out

    def _dir(self, kind: str, name: str) -> str:
        path = os.path.join(self.pod_dir, "volumes", kind, name)
        os.makedirs(path, exist_ok=True)
        return path

    def _prepare(self, vol: Obj) -> str:
        name = vol["name"]
        if "emptyDir" in vol:
            return self._dir("empty-dir", name)
        if "hostPath" in vol:
            hp = vol["hostPath"]
            path = hp["path"]
            kind = hp.get("type", "")
            if kind == "DirectoryOrCreate" or (kind == "" and not os.path.exists(path)):
                os.makedirs(path, exist_ok=True)
            elif kind == "FileOrCreate" and not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, "a").close()
            elif not os.path.exists(path):
                raise ConfigError(f"hostPath {path!r} does not exist")
            return str(path)
        if "persistentVolumeClaim" in vol:
            return self._claim(vol["persistentVolumeClaim"]["claimName"])
        if "secret" in vol:
            src = vol["secret"]
            files = self._keyed_files(f"secrets/{src['secretName']}", secret_data, src, "secret")
            return self._write("secret", name, files, src.get("defaultMode", 0o644))
        if "configMap" in vol:
            src = vol["configMap"]
            files = self._keyed_files(f"configmaps/{src['name']}", configmap_data, src, "configmap")
            return self._write("configmap", name, files, src.get("defaultMode", 0o644))
        if "downwardAPI" in vol:
            files = self._downward(vol["downwardAPI"].get("items") or [])
            return self._write("downward-api", name, files, vol["downwardAPI"].get("defaultMode", 0o644))
        if "projected" in vol:
            return self._write("projected", name, self._projected(vol["projected"]), 0o644)
        raise ConfigError(f"volume {name!r}: unsupported volume type (local kubelet)")

    def _get(self, rel: str) -> Obj | None:
        return self.api.get_or_none(f"/api/v1/namespaces/{self.ns}/{rel}")

    def _claim(self, claim: str) -> str:
        pvc = self._get(f"persistentvolumeclaims/{claim}")
        if pvc is None:
            raise ConfigError(f'persistentvolumeclaim "{claim}" not found')
        pv_name = pvc.get("spec", {}).get("volumeName")
        if not pv_name or pvc.get("status", {}).get("phase") != "Bound":
            raise ConfigError(f'persistentvolumeclaim "{claim}" is not bound yet')
        pv = self.api.get(f"/api/v1/persistentvolumes/{pv_name}")
        spec = pv.get("spec", {})
        path = (spec.get("hostPath") or {}).get("path") or (spec.get("local") or {}).get("path")
        if not path:
            raise ConfigError(f"persistentvolume {pv_name!r} is neither hostPath nor local")
        os.makedirs(path, exist_ok=True)
        return str(path)

    def _keyed_files(
        self, rel: str, data: Callable[[Obj], dict[str, str]], src: Obj, kind: str
    ) -> dict[str, str]:
        obj = self._get(rel)
        if obj is None:
            if src.get("optional"):
                return {}
            raise ConfigError(f"{kind} {src.get('secretName') or src.get('name')!r} not found")
        values = data(obj)
        items = src.get("items")
        if not items:
            return values
        out = {}
        for item in items:
            if item["key"] not in values:
                if src.get("optional"):
                    continue
                raise ConfigError(f"{kind} key {item['key']!r} not found")
            out[item["path"]] = values[item["key"]]
        return out

    def _downward(self, items: list[Obj]) -> dict[str, str]:
        out = {}
        for item in items:
            if "fieldRef" in item:
                out[item["path"]] = field_ref(self.pod, item["fieldRef"]["fieldPath"])
            else:
                raise ConfigError("downwardAPI volume: only fieldRef items are supported")
        return out

    def _projected(self, proj: Obj) -> dict[str, str]:
        files: dict[str, str] = {}
        for src in proj.get("sources") or []:
            if "serviceAccountToken" in src:
                sat = src["serviceAccountToken"]
                files[sat["path"]] = self._token(sat)
            elif "configMap" in src:
                cm = src["configMap"]
                files.update(self._keyed_files(f"configmaps/{cm['name']}", configmap_data, cm, "configmap"))
            elif "secret" in src:
                s = src["secret"]
                files.update(self._keyed_files(f"secrets/{s['name']}", secret_data, s, "secret"))
            elif "downwardAPI" in src:
                files.update(self._downward(src["downwardAPI"].get("items") or []))
            else:
                raise ConfigError(f"projected volume source {sorted(src)} is not supported")
        return files

    def _token(self, sat: Obj) -> str:
        meta = self.pod["metadata"]
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        spec: Obj = {
            "expirationSeconds": int(sat.get("expirationSeconds", 3607)),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
        }
        if sat.get("audience"):
            spec["audiences"] = [sat["audience"]]
        try:
            resp = self.api.create(
                f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token",
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
            )
        except ApiError as e:
            raise ConfigError(f"token request for serviceaccount {sa!r} failed: {e}") from e
        return str(resp["status"]["token"])

    def _write(self, kind: str, name: str, files: dict[str, str], mode: int) -> str:
        path = os.path.join(self.pod_dir, "volumes", kind, name)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.makedirs(path)
        for rel, content in files.items():
            dest = os.path.join(path, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "w") as f:
                f.write(content)
            os.chmod(dest, mode)
        return path
