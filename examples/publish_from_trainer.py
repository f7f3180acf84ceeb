"""Publish weights from a trainer's memory to an InferencePool, and wait until every replica serves them.

    pip install "./[trainer]"
    python examples/publish_from_trainer.py --pool chat --checkpoint /data/ckpts/v2 --version step-1 \\
        --host 10.0.0.5            # the address the pool's pods reach this process on

Several ranks, each publishing a disjoint share of the tensors (what FSDP/TP ranks do with theirs):

    torchrun --nproc-per-node 2 examples/publish_from_trainer.py --pool chat ... --host 10.0.0.5

The tensors here come from a safetensors checkpoint so the example runs anywhere; in a trainer they are
the model's own (`model.state_dict().items()`, on the GPU: the SDK copies them into pinned host memory
once per step and fingerprints them where they live). No file is written.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from hotswap_trainer import Publisher, PublishFailed
from safetensors.torch import load_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", required=True)
    ap.add_argument("--namespace", default="default")
    ap.add_argument(
        "--checkpoint", required=True, type=Path, help="a .safetensors file or a directory of them"
    )
    ap.add_argument("--version", required=True)
    ap.add_argument("--host", required=True, help="this process's address as the pool's pods reach it")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()

    if "RANK" in os.environ:  # started by torchrun: one share of the tensors per rank
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

    files = [args.checkpoint] if args.checkpoint.is_file() else sorted(args.checkpoint.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    mine = [(name, tensors[name]) for name in sorted(tensors)[rank::world]]

    with Publisher(args.pool, args.namespace, local_hostname=args.host) as pub:
        t0 = time.monotonic()
        handle = pub.publish(args.version, mine)
        print(f"rank {rank}: published {len(mine)} tensors as {args.version} in {time.monotonic() - t0:.3f}s")
        try:
            handle.wait(args.timeout)
        except PublishFailed as e:
            raise SystemExit(f"rank {rank}: {e}") from e
        print(
            f"rank {rank}: {args.version} is served by every replica, {handle.seconds:.2f}s after publish()"
        )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
