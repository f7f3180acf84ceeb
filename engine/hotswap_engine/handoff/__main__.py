"""python -m hotswap_engine.handoff --selftest-cuda | --selftest-cpu  (see selftest.py)."""

from __future__ import annotations

import argparse
import sys

import torch

from .selftest import run_selftest


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m hotswap_engine.handoff")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--selftest-cuda", action="store_true", help="CUDA IPC slots (needs a GPU)")
    g.add_argument("--selftest-cpu", action="store_true", help="shared-memory slots")
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
    if args.selftest_cuda and not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return 2
    sender = args.sender_device or ("cuda:0" if args.selftest_cuda else "cpu")
    receiver = args.receiver_device or sender
    slot_bytes = int(args.slot_mib * 2**20) // 64 * 64
    ok = all(run_selftest(sender, receiver, mode, slot_bytes, args.scale) for mode in ("weights", "slices"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
