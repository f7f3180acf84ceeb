"""Byte-exact check of the hand-off between two processes, usable without vLLM.

`python -m hotswap_testing.handoff_selftest --cuda` runs it on a GPU machine (CUDA IPC slots);
`--cpu` runs the same code over shared memory. The receiver process rebuilds the expected
tensors from the same seed, so nothing but the hand-off carries data between the two processes.
The helpers are module-level so that multiprocessing's spawn can import them (tests use them too).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hotswap_engine.handoff import HandoffError, HandoffReceiver, HandoffSender, create_slots

from .handoff_push import pack_naive, push_tensors, send_bucket, tensor_bytes


def make_tensors(seed: int, scale: int = 1) -> list[tuple[str, torch.Tensor]]:
    """A deterministic mix of dtypes and sizes: tiny, empty, odd-sized (unaligned), and one tensor
    larger than any sensible test bucket so it is chunked."""
    g = torch.Generator().manual_seed(seed)
    out: list[tuple[str, torch.Tensor]] = [
        ("big.weight", torch.randn(256 * scale, 1024, generator=g).to(torch.bfloat16)),
        ("layer.0.f32", torch.randn(33, 17, generator=g)),
        ("layer.0.f16", torch.randn(5, 7, generator=g).to(torch.float16)),
        ("layer.0.i64", torch.randint(-(2**40), 2**40, (13,), generator=g)),
        ("layer.0.mask", torch.randint(0, 2, (9,), generator=g).bool()),
        ("layer.0.empty", torch.empty(0, 4)),
        ("layer.1.u8", torch.randint(0, 256, (1001,), generator=g, dtype=torch.uint8)),
        ("layer.1.scalar", torch.tensor(3.25)),
    ]
    out += [(f"layer.2.w{i}", torch.randn(64, 64, generator=g)) for i in range(8)]
    return out


def digest(t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode())
    h.update(tensor_bytes(t.cpu()).numpy().tobytes())
    return h.hexdigest()


def digests(tensors: Sequence[tuple[str, torch.Tensor]]) -> dict[str, str]:
    return {name: digest(t) for name, t in tensors}


def receiver_main(
    endpoint: str,
    result_path: str,
    *,
    rank: int = 0,
    device: str = "cpu",
    mode: str = "weights",
    delay_s: float = 0.0,
    timeout: float = 30.0,
    seed: int = 0,
    scale: int = 1,
) -> None:
    """Receive one session and write {"ok", "version", "digests" | "error_type", "error"} as JSON.
    mode "weights": whole tensors via weights(); mode "slices": copy chunks into parameters
    preallocated from the shapes of make_tensors(seed), as a plain inference process would."""
    result: dict[str, Any] = {"ok": False}
    with HandoffReceiver(endpoint, rank, device, timeout=timeout) as rx:
        try:
            result["version"] = rx.wait_begin()
            got: dict[str, torch.Tensor] = {}
            if mode == "weights":
                for name, t in rx.weights():
                    got[name] = t
                    time.sleep(delay_s)
            else:
                params = {n: torch.zeros_like(t, device=device) for n, t in make_tensors(seed, scale)}
                for entry, view in rx.slices():
                    dst = tensor_bytes(params[entry.name]) if params[entry.name].numel() else None
                    if dst is not None:
                        # tensor_bytes of a contiguous param is a view: this writes the parameter.
                        dst[entry.tensor_offset : entry.tensor_offset + entry.nbytes].copy_(view)
                    got[entry.name] = params[entry.name]
                    time.sleep(delay_s)
            rx.done()
            result.update(ok=True, digests=digests(list(got.items())))
        except HandoffError as e:
            rx.fail(str(e))
            result.update(error_type=type(e).__name__, error=str(e))
    Path(result_path).write_text(json.dumps(result))


def sender_die_main(endpoint: str, shm_dir: str) -> None:
    """A sender that begins, sends one bucket, then dies without a word (for peer-loss tests)."""
    tensors = make_tensors(0)[1:]  # small ones first, so the first bucket holds whole tensors
    sender = HandoffSender(endpoint, 1, timeout=30)
    slots = create_slots(2, 64 << 10, torch.device("cpu"), shm_dir)
    sender.begin("v-dying", slots)
    send_bucket(sender, slots[0], 0, pack_naive(tensors, 8 << 10)[0])
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


def run_selftest(sender_device: str, receiver_device: str, mode: str, slot_bytes: int, scale: int) -> bool:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"ipc://{tmp}/handoff.sock"
        result_path = f"{tmp}/result.json"
        tensors = make_tensors(7, scale)
        slots = create_slots(3, slot_bytes, torch.device(sender_device), tmp)
        proc = ctx.Process(
            target=receiver_main,
            args=(endpoint, result_path),
            kwargs={"device": receiver_device, "mode": mode, "seed": 7, "scale": scale},
        )
        proc.start()
        with HandoffSender(endpoint, 1, timeout=120) as sender:
            sender.wait_workers()  # the receiver process starting up is not part of the hand-off
            start = time.perf_counter()
            buckets = push_tensors(sender, "selftest", slots, tensors)
            seconds = time.perf_counter() - start
        proc.join(60)
        for s in slots:
            s.close()
        result = json.loads(Path(result_path).read_text())
    nbytes = sum(tensor_bytes(t).numel() for _, t in tensors)
    ok = bool(result.get("ok")) and result.get("digests") == digests(tensors)
    print(
        f"hand-off selftest {sender_device}->{receiver_device} mode={mode}: "
        f"{'OK' if ok else 'FAILED'}; {len(tensors)} tensors, {nbytes / 2**20:.1f} MiB, "
        f"{buckets} buckets in {seconds:.3f}s (begin to every worker's done)"
    )
    if not ok:
        print(json.dumps({k: v for k, v in result.items() if k != "digests"}))
    return ok


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m hotswap_testing.handoff_selftest")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--cuda", action="store_true", help="CUDA IPC slots (needs a GPU)")
    g.add_argument("--cpu", action="store_true", help="shared-memory slots")
    p.add_argument("--sender-device", default=None, help="default cuda:0 / cpu")
    p.add_argument("--receiver-device", default=None, help="default: the sender's device")
    p.add_argument(
        "--slot-mib",
        type=float,
        default=0.25,
        help="slot size (the big tensor is 0.5 MiB × scale, so it is chunked)",
    )
    p.add_argument("--scale", type=int, default=1, help="multiplies the big tensor's size")
    args = p.parse_args()
    if args.cuda and not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return 2
    sender = args.sender_device or ("cuda:0" if args.cuda else "cpu")
    receiver = args.receiver_device or sender
    slot_bytes = int(args.slot_mib * 2**20) // 64 * 64
    ok = all(run_selftest(sender, receiver, mode, slot_bytes, args.scale) for mode in ("weights", "slices"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
