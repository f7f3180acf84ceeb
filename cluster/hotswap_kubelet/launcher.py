"""Runs inside a container's new process, before its command: places the volume mounts, then execs.

Usage: python launcher.py SPEC.json. The spec holds argv, env, cwd, mounts and the mount mode:
- "namespace": a private mount namespace per container (unshare(CLONE_NEWNS)) with bind mounts,
  read-only where asked; nothing is visible outside the process tree.
- "symlink": the fallback where mount namespaces are forbidden: each mountPath becomes a symlink
  to the volume's folder (shared by every process on the host, readOnly not enforced; two running
  pods needing different sources at one mountPath fail with a clear message; a link left by a
  deleted pod is replaced).
This file imports only the standard library: it runs before anything else in the container.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from typing import Any

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18


def _libc_call(libc: Any, fn: str, *args: Any) -> None:
    if getattr(libc, fn)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(
            err, f"{fn}{tuple(a.decode() if isinstance(a, bytes) else a for a in args)}: {os.strerror(err)}"
        )


def _ensure_target(source: str, target: str) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    elif not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()


def mount_namespace(mounts: list[dict[str, Any]]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    _libc_call(libc, "unshare", CLONE_NEWNS)
    # Private propagation so our bind mounts never leak back to the host's namespace.
    _libc_call(libc, "mount", None, b"/", None, MS_REC | MS_PRIVATE, None)
    for m in mounts:
        src, dst = m["source"].encode(), m["target"].encode()
        _ensure_target(m["source"], m["target"])
        _libc_call(libc, "mount", src, dst, None, MS_BIND | MS_REC, None)
        if m["readOnly"]:
            _libc_call(libc, "mount", None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)


def symlinks(mounts: list[dict[str, Any]]) -> None:
    for m in mounts:
        target, source = m["target"].rstrip("/"), m["source"]
        if os.path.islink(target) and not os.path.exists(target):
            os.unlink(target)  # left by a pod that is gone (its folder was removed)
        if os.path.islink(target):
            if os.readlink(target) == source:
                continue
            raise OSError(
                f"mountPath {target} already links to {os.readlink(target)} (another pod); symlink mode"
            )
        if os.path.exists(target):
            raise OSError(f"mountPath {target} exists on the host; symlink mode cannot place a volume there")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(source, target)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    try:
        if spec["mounts"]:
            if spec["mountMode"] == "namespace":
                mount_namespace(spec["mounts"])
            else:
                symlinks(spec["mounts"])
        os.chdir(spec["cwd"])
        os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
    except OSError as e:
        print(f"hotswap-kubelet: cannot start container: {e}", file=sys.stderr, flush=True)
        os._exit(128)


if __name__ == "__main__":
    main()
