"""Per-pod loopback addresses (127.0.0.N): allocation and release.

The whole 127.0.0.0/8 block routes to the loopback interface on Linux, so each pod's processes can
bind their own address and every pod can use the same ports.
"""

from __future__ import annotations

import ipaddress
import threading


def parse_range(spec: str) -> list[str]:
    """'127.0.0.16-127.0.0.254' -> every address in it; each must be a loopback address."""
    first_s, _, last_s = spec.partition("-")
    first = ipaddress.IPv4Address(first_s.strip())
    last = ipaddress.IPv4Address((last_s or first_s).strip())
    if last < first:
        raise ValueError(f"empty pod IP range {spec!r}")
    out = []
    for n in range(int(first), int(last) + 1):
        ip = ipaddress.IPv4Address(n)
        if not ip.is_loopback:
            raise ValueError(f"pod IP {ip} is not a loopback address")
        out.append(str(ip))
    return out


class PodIPAllocator:
    """Hands out each address to at most one pod uid; thread-safe."""

    def __init__(self, addresses: list[str]) -> None:
        self._free = list(addresses)
        self._owner: dict[str, str] = {}  # ip -> pod uid
        self._lock = threading.Lock()

    def allocate(self, uid: str, preferred: str | None = None) -> str:
        """The pod's address: its existing one, `preferred` if free (re-adoption after a kubelet
        restart keeps the IP the pod's status already shows), else the lowest free one."""
        with self._lock:
            for ip, owner in self._owner.items():
                if owner == uid:
                    return ip
            if preferred is not None and preferred in self._free:
                ip = preferred
            elif self._free:
                ip = self._free[0]
            else:
                raise RuntimeError("no free pod IP left in the configured range")
            self._free.remove(ip)
            self._owner[ip] = uid
            return ip

    def release(self, uid: str) -> None:
        with self._lock:
            for ip, owner in list(self._owner.items()):
                if owner == uid:
                    del self._owner[ip]
                    self._free.append(ip)
            self._free.sort(key=lambda a: int(ipaddress.IPv4Address(a)))

    def in_use(self) -> dict[str, str]:
        with self._lock:
            return dict(self._owner)
