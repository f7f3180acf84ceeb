"""A small JSON client for the Kubernetes API: objects stay plain dicts.

The kubelet touches a handful of endpoints and patches status with strategic-merge patches; plain
dicts keep that explicit and avoid the generated client's slow model round trips.
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import urllib3
import yaml

Obj = dict[str, Any]


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Credentials:
    server: str
    token: str
    ca_pem: bytes


def load_kubeconfig(path: str) -> Credentials:
    """Reads the current context of a token-based kubeconfig (the kind cluster-up writes)."""
    with open(path) as f:
        cfg = yaml.safe_load(f)
    ctx_name = cfg["current-context"]
    ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
    cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
    user = next(u["user"] for u in cfg["users"] if u["name"] == ctx["user"])
    return Credentials(
        server=cluster["server"],
        token=user["token"],
        ca_pem=base64.b64decode(cluster["certificate-authority-data"]),
    )


class KubeApi:
    def __init__(self, creds: Credentials, timeout: float = 30.0) -> None:
        self.creds = creds
        with tempfile.NamedTemporaryFile("wb", suffix=".crt", delete=False) as f:
            f.write(creds.ca_pem)
            ca_file = f.name
        ctx = ssl.create_default_context(cafile=ca_file)
        self._http = urllib3.PoolManager(
            maxsize=64, ssl_context=ctx, timeout=urllib3.Timeout(connect=5.0, read=timeout)
        )
        self._headers = {"Authorization": f"Bearer {creds.token}", "Accept": "application/json"}

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        url = self.creds.server + path + (("?" + urlencode(query)) if query else "")
        headers = dict(self._headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        resp = self._http.request(method, url, body=data, headers=headers)
        text = resp.data.decode(errors="replace")
        if resp.status >= 400:
            raise ApiError(resp.status, text)
        return json.loads(text) if text else {}

    def get(self, path: str, query: dict[str, str] | None = None) -> Obj:
        return self.request("GET", path, query=query)

    def get_or_none(self, path: str) -> Obj | None:
        try:
            return self.get(path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def create(self, path: str, body: Obj) -> Obj:
        return self.request("POST", path, body)

    def strategic_patch(self, path: str, body: Obj) -> Obj:
        return self.request("PATCH", path, body, content_type="application/strategic-merge-patch+json")

    def merge_patch(self, path: str, body: Obj) -> Obj:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def delete(self, path: str, body: Obj | None = None) -> Obj:
        return self.request("DELETE", path, body)

    def watch(self, path: str, resource_version: str, timeout_seconds: int = 60) -> Iterator[Obj]:
        """Yields watch events ({"type", "object"}) until the server ends the stream."""
        query = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        url = self.creds.server + path + "?" + urlencode(query)
        resp = self._http.request(
            "GET",
            url,
            headers=self._headers,
            preload_content=False,
            timeout=urllib3.Timeout(connect=5.0, read=timeout_seconds + 10),
        )
        try:
            if resp.status >= 400:
                raise ApiError(resp.status, resp.read().decode(errors="replace"))
            buf = b""
            for chunk in resp.stream(65536):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            resp.release_conn()
