"""Pure helpers that turn a pod spec into a process's command line and environment.

No I/O here: Secrets and ConfigMaps arrive through lookup callables so this logic is unit-tested
without a cluster.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from typing import Any

Obj = dict[str, Any]
# (namespace-less) name -> object or None if missing
Lookup = Callable[[str], Obj | None]


class ConfigError(Exception):
    """The container cannot start yet (the kubelet reports CreateContainerConfigError)."""


_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)|\$\$")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes $(VAR) expansion: known names are replaced, unknown ones kept, $$ escapes."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _VAR_REF.sub(sub, value)


def field_ref(pod: Obj, path: str) -> str:
    """The downward API's fieldRef values that the kubelet resolves for env vars and files."""
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    status = pod.get("status", {})
    simple: dict[str, str] = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": status.get("podIP", ""),
        "status.hostIP": status.get("hostIP", ""),
        "status.podIPs": ",".join(ip["ip"] for ip in status.get("podIPs", [])),
        "status.hostIPs": ",".join(ip["ip"] for ip in status.get("hostIPs", [])),
    }
    if path in simple:
        return simple[path]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return str(meta.get(m.group(1), {}).get(m.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1], {})
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise ConfigError(f"unsupported fieldRef {path!r}")


def secret_data(secret: Obj) -> dict[str, str]:
    out = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    out.update(secret.get("stringData") or {})
    return out


def configmap_data(cm: Obj) -> dict[str, str]:
    out = dict(cm.get("data") or {})
    out.update({k: base64.b64decode(v).decode() for k, v in (cm.get("binaryData") or {}).items()})
    return out


def resource_ref(container: Obj, resource: str, divisor: str | None) -> str:
    """resourceFieldRef: the container's limit (or request) as written; divisors other than 1
    are not supported (nothing here needs them)."""
    kind, _, name = resource.partition(".")
    value = container.get("resources", {}).get(kind, {}).get(name)
    if value is None and kind == "limits":
        value = container.get("resources", {}).get("requests", {}).get(name)
    if divisor not in (None, "1", "0"):
        raise ConfigError(f"resourceFieldRef divisor {divisor!r} is not supported")
    return str(value if value is not None else "0")


def container_env(
    pod: Obj,
    container: Obj,
    base: Mapping[str, str],
    secrets: Lookup,
    configmaps: Lookup,
) -> dict[str, str]:
    """The environment of a container's process: `base` (the kubelet's service variables), then
    envFrom, then env, in the kubelet's order, with $(VAR) references to earlier entries expanded."""
    env: dict[str, str] = dict(base)
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix", "")
        if "configMapRef" in src:
            ref = src["configMapRef"]
            cm = configmaps(ref["name"])
            if cm is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'configmap "{ref["name"]}" not found')
            env.update({prefix + k: v for k, v in configmap_data(cm).items()})
        elif "secretRef" in src:
            ref = src["secretRef"]
            secret = secrets(ref["name"])
            if secret is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'secret "{ref["name"]}" not found')
            env.update({prefix + k: v for k, v in secret_data(secret).items()})
    for var in container.get("env") or []:
        name = var["name"]
        if "value" in var:
            env[name] = expand(var["value"], env)
            continue
        src = var.get("valueFrom")
        if src is None:
            env[name] = ""
        elif "fieldRef" in src:
            env[name] = field_ref(pod, src["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in src:
            ref = src["resourceFieldRef"]
            env[name] = resource_ref(container, ref["resource"], ref.get("divisor"))
        elif "secretKeyRef" in src:
            value = _keyed(secrets, src["secretKeyRef"], secret_data, "secret")
            if value is not None:
                env[name] = value
        elif "configMapKeyRef" in src:
            value = _keyed(configmaps, src["configMapKeyRef"], configmap_data, "configmap")
            if value is not None:
                env[name] = value
        else:
            raise ConfigError(f"unsupported valueFrom for env {name!r}")
    return env


def _keyed(lookup: Lookup, ref: Obj, data: Callable[[Obj], dict[str, str]], kind: str) -> str | None:
    obj = lookup(ref["name"])
    optional = bool(ref.get("optional"))
    if obj is None:
        if optional:
            return None
        raise ConfigError(f'{kind} "{ref["name"]}" not found')
    values = data(obj)
    if ref["key"] not in values:
        if optional:
            return None
        raise ConfigError(f"couldn't find key {ref['key']} in {kind} {ref['name']}")
    return values[ref["key"]]


def command_line(container: Obj, env: Mapping[str, str]) -> list[str]:
    """command + args with $(VAR) expansion. Images are ignored here, so a container without a
    command has nothing to run (there is no image entrypoint to fall back on)."""
    command = [expand(c, env) for c in container.get("command") or []]
    args = [expand(a, env) for a in container.get("args") or []]
    if not command:
        raise ConfigError(
            f"container {container['name']!r} has no command: the local kubelet ignores images, "
            "so every container needs an explicit command"
        )
    return command + args


def named_port(container: Obj, port: int | str) -> int:
    if isinstance(port, int):
        return port
    if port.isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ConfigError(f"container {container['name']!r} has no port named {port!r}")
