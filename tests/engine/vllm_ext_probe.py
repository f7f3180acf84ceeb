"""Drives HotswapWorkerExtension inside an offline vLLM engine and reports what it saw as JSON.

Run as a subprocess by test_vllm_ext.py (vLLM initialises torch.distributed in its process, which must
not leak into the test process): python vllm_ext_probe.py BASE_DIR VARIANT_DIR WORKDIR
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from hotswap_engine.handoff import HandoffSender, create_slots
from hotswap_testing.handoff_push import pack_naive, push_tensors, send_bucket
from hotswap_testing.tiny_model import ENGINE_KWARGS, weight_files
from safetensors.torch import load_file

PROMPT = "The quick brown fox"


def tensors(model_dir: str) -> list[tuple[str, torch.Tensor]]:
    out: list[tuple[str, torch.Tensor]] = []
    for f in weight_files(model_dir):
        out += sorted(load_file(f).items())
    return out


def main(base: str, variant: str, workdir: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.model_executor.model_loader.reload import layerwise

    extension = "hotswap_engine.inference.vllm_ext.HotswapWorkerExtension"
    llm = LLM(model=base, worker_extension_cls=extension, **ENGINE_KWARGS)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()

    def generate() -> str:
        llm.reset_prefix_cache()  # the launcher's pause does this; here we call it by hand
        text: str = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].text
        return text

    sender = HandoffSender(f"ipc://{workdir}/handoff.sock", 1, timeout=20)
    slots = create_slots(2, 96 << 10, torch.device("cpu"), workdir)

    def rpc(version: str, push: Any) -> tuple[Any, str | None]:
        thread = threading.Thread(target=push)
        thread.start()
        try:
            return llm.collective_rpc("hotswap_apply", args=(sender.endpoint, version, 20.0)), None
        except Exception as e:
            return None, str(e)
        finally:
            thread.join(30)

    def aborting(version: str, model_dir: str, after: int) -> Any:
        def push() -> None:
            size = slots[0].nbytes
            sender.begin(version, slots)
            for i, bucket in enumerate(pack_naive(tensors(model_dir), size - size % 64)[:after]):
                sender.wait_slot_free(i % 2)
                send_bucket(sender, slots[i % 2], i % 2, bucket)
            sender.wait_slot_free(0)
            sender.abort("cancelled by the probe")

        return push

    report: dict[str, Any] = {"base": generate()}
    result, error = rpc("v1", lambda: push_tensors(sender, "v1", slots, tensors(variant)))
    report.update(v1_result=result, v1_error=error, v1=generate())

    _, report["abort_error"] = rpc("v-broken", aborting("v-broken", variant, 3))
    report["meta_params"] = [n for n, p in model.named_parameters() if p.is_meta]
    report["pending_layers"] = sum(1 for m in model.modules() if layerwise.get_layerwise_info(m).can_load())
    report["after_abort"] = generate()  # must run: no layer may be left on the meta device

    result, error = rpc("base", lambda: push_tensors(sender, "base", slots, tensors(base)))
    report.update(restore_error=error, restored=generate())

    def wrong_version() -> None:
        sender.begin("other", slots)
        try:
            sender.end()
        except Exception:
            sender.abort("probe: expected failure")

    _, report["mismatch_error"] = rpc("v2", wrong_version)
    sender.close()
    for s in slots:
        s.close()
    print("PROBE " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], str(Path(sys.argv[3])))
