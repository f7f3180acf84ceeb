"""A tiny, locally built Qwen3 model directory for tests and the demo (nothing from a hub).

`build_tiny_model(out_dir, seed)` writes config, safetensors weights (optionally sharded with
model.safetensors.index.json) and a byte-level BPE tokenizer trained on a few sentences.
`make_variant(base_dir, out_dir, seed)` writes the "new version": the same files, names, shapes and
dtypes with different values, plus the base's config and tokenizer, so vLLM can also start on it.
`make_trained(base_dir, out_dir)` writes a version that was taught one sentence (a few optimizer steps
on CPU, seconds): "The quick brown fox" continues " jumps over the lazy dog.", so a swap shows as text.

CLI: python -m hotswap_testing.tiny_model OUT_DIR [--seed N] [--variant-of BASE | --trained-from BASE]
     [--shards N]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch

INDEX_FILE = "model.safetensors.index.json"

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Weights move from the trainer to every inference pod without a restart.",
    "A new version of the model is served as soon as every worker has applied it.",
    "Kubernetes schedules pods; the operator decides which version each pod serves.",
    "Hello world! Numbers like 0 1 2 3 4 5 6 7 8 9 and symbols like , . ; : ? ! are fine.",
    "Once upon a time there was a small language model that learned very little.",
]
EOS = "<|endoftext|>"


def train_tokenizer(out_dir: Path) -> int:
    """Trains and saves the tokenizer; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=None)
    fast.model_max_length = 512
    fast.save_pretrained(out_dir)
    return len(fast)


def build_tiny_model(
    out_dir: str | Path, seed: int = 0, *, shards: int = 1, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """A 2-layer Qwen3 (hidden 128) with random weights from `seed`. `shards` > 1 splits the weights
    into that many files with an index (approximately: by size)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(out)
    eos_id = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"][EOS]
    config = Qwen3Config(
        vocab_size=-(-vocab // 64) * 64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        # wider than the usual 0.02 so greedy decoding of a random model is not flat (distinct versions
        # then produce distinct text)
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        dtype=str(dtype).removeprefix("torch."),
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.to(dtype=dtype)  # type: ignore[call-arg]
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    max_shard = f"{size // shards // 1000 + 1}KB" if shards > 1 else f"{size}GB"
    model.save_pretrained(out, max_shard_size=max_shard, safe_serialization=True)
    return out


def weight_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    index = d / INDEX_FILE
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / n for n in names]
    return sorted(d.glob("*.safetensors"))


def make_variant(base_dir: str | Path, out_dir: str | Path, seed: int) -> Path:
    """Same layout as `base_dir`, values changed: each tensor moves by about half its own spread
    (norm weights, all ones at init, by 0.1), so the variant is a plausible model of its own."""
    from safetensors.torch import load_file, save_file

    base, out = Path(base_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    g = torch.Generator().manual_seed(seed)
    for f in weight_files(base):
        tensors = load_file(f)
        changed = {}
        for name in sorted(tensors):
            t = tensors[name]
            if not t.is_floating_point():
                changed[name] = t.clone()
                continue
            spread = float(t.float().std()) if t.numel() > 1 else 0.0
            noise = torch.randn(t.shape, generator=g) * (0.5 * spread if spread > 0 else 0.1)
            changed[name] = (t.float() + noise).to(t.dtype)
        save_file(changed, out / f.name, metadata={"format": "pt"})
    return out


PROMPT = "The quick brown fox"
CONTINUATION = " jumps over the lazy dog."


def teach(model: Any, tokenizer: Any, prompt: str, continuation: str, steps: int, lr: float = 3e-3) -> float:
    """`steps` AdamW steps on `prompt + continuation` (repeated), the loss on the continuation only;
    returns the last loss. Plain causal-LM fine-tuning: what the RL example and the demo's step do."""
    text = prompt + continuation + " " + prompt + continuation
    ids = tokenizer(text, return_tensors="pt").input_ids
    labels = ids.clone()
    labels[:, : len(tokenizer(prompt).input_ids)] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def make_trained(
    base_dir: str | Path,
    out_dir: str | Path,
    prompt: str = PROMPT,
    continuation: str = CONTINUATION,
    steps: int = 30,
) -> Path:
    """The base model after `steps` optimizer steps on one sentence (float32 on CPU, saved in the base's
    dtype, same names and shapes): greedy decoding of `prompt` then says `continuation`. Deterministic."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    base, out = Path(base_dir), Path(out_dir)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = Qwen3ForCausalLM.from_pretrained(base, dtype=torch.float32)
    teach(model, tok, prompt, continuation, steps)
    dtype = getattr(torch, json.loads((base / "config.json").read_text()).get("dtype") or "bfloat16")
    out.mkdir(parents=True, exist_ok=True)
    model.to(dtype=dtype).save_pretrained(out, safe_serialization=True)  # type: ignore[call-arg]
    for f in base.iterdir():  # the base's tokenizer and config, byte for byte
        if f.is_file() and f.suffix != ".safetensors" and f.name != INDEX_FILE:
            shutil.copy2(f, out / f.name)
    return out


# Engine settings for tests: small KV cache (the default takes 92% of RAM on CPU), eager mode.
ENGINE_KWARGS: dict[str, Any] = {
    "enforce_eager": True,
    "kv_cache_memory_bytes": 32 << 20,
    "max_model_len": 256,
    "seed": 0,
}


def greedy_completions(model_dir: str | Path, prompts: list[str], max_tokens: int) -> list[str]:
    """What a fresh vLLM engine on `model_dir` answers (temperature 0, exactly `max_tokens` tokens).
    Runs vLLM in this process: call it in a subprocess (the CLI's --complete) with
    VLLM_ENABLE_V1_MULTIPROCESSING=0 to keep it to one small process."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), **ENGINE_KWARGS)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].text for o in outputs]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m hotswap_testing.tiny_model")
    p.add_argument("out_dir", help="model dir to write (or, with --complete, to run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant-of", metavar="BASE", help="write a variant of this model dir instead")
    p.add_argument("--trained-from", metavar="BASE", help="write BASE taught one sentence (make_trained)")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--complete", action="store_true", help="print greedy completions of --prompt as JSON")
    p.add_argument("--prompt", action="append", default=[])
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args()
    if args.complete:
        texts = greedy_completions(args.out_dir, args.prompt, args.max_tokens)
        print("HOTSWAP_COMPLETIONS " + json.dumps(texts))
    elif args.trained_from:
        print(make_trained(args.trained_from, args.out_dir))
    elif args.variant_of:
        print(make_variant(args.variant_of, args.out_dir, args.seed))
    else:
        print(build_tiny_model(args.out_dir, args.seed, shards=args.shards, dtype=getattr(torch, args.dtype)))


if __name__ == "__main__":
    main()
