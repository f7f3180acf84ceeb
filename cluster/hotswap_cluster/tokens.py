"""Kubernetes clients that act as a ServiceAccount (token from the TokenRequest API)."""

from __future__ import annotations

from typing import Any

from kubernetes import client


def service_account_token(api: client.ApiClient, namespace: str, name: str, seconds: int = 3600) -> str:
    req = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=seconds)
    )
    resp: Any = client.CoreV1Api(api).create_namespaced_service_account_token(name, namespace, req)
    return str(resp.status.token)


def client_for_token(admin: client.ApiClient, token: str) -> client.ApiClient:
    """Same server and CA as `admin`, authenticated only by `token`."""
    cfg = client.Configuration()
    cfg.host = admin.configuration.host
    cfg.ssl_ca_cert = admin.configuration.ssl_ca_cert
    cfg.verify_ssl = True
    cfg.api_key = {"authorization": token}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    return client.ApiClient(cfg)


def client_for_service_account(admin: client.ApiClient, namespace: str, name: str) -> client.ApiClient:
    return client_for_token(admin, service_account_token(admin, namespace, name))
