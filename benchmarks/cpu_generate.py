"""outrider generate vs transformers generate on the embedded SmolLM2 (CPU, greedy).

Same prompts, same max tokens (EOS ignored so every run decodes the same count), batch 1 and
batch 8 through each library's Python API. Prints tokens/s for each.

    .venv/bin/python benchmarks/cpu_generate.py [--max-tokens 64] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

PROMPTS = [
    "Write a short story about a dragon who learns to bake.",
    "Explain how a refrigerator works.",
    "What are the main causes of the French Revolution?",
    "Give me five tips for learning a new language.",
    "Describe the water cycle.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.",
    "How do vaccines train the immune system?",
]


def bench_outrider(ids: list[list[int]], max_tokens: int) -> dict[str, float]:
    from outrider.cluster.config import OutriderConfig
    from outrider.cluster.llm import LLM
    from outrider.workers.config import ModelConfig, SamplingParams, WorkerConfig

    llm = LLM(OutriderConfig(target=WorkerConfig(model=ModelConfig(dtype="float32"))))
    p = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(ids[:1], SamplingParams(temperature=0.0, max_tokens=4))
    t0 = time.perf_counter()
    for one in ids[:2]:
        llm.generate([one], p)
    b1 = 2 * max_tokens / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    llm.generate(ids, p)
    b8 = len(ids) * max_tokens / (time.perf_counter() - t0)
    return {"batch1": b1, "batch8": b8}


def bench_transformers(ids: list[list[int]], max_tokens: int, pad_id: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    from outrider.workers.models.loader import resolve_model_path

    path = Path(resolve_model_path(None))
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    kw = {
        "do_sample": False,
        "max_new_tokens": max_tokens,
        "min_new_tokens": max_tokens,
        "pad_token_id": pad_id,
    }
    with torch.inference_mode():
        model.generate(
            torch.tensor([ids[0]]), do_sample=False, max_new_tokens=4, pad_token_id=pad_id
        )
        t0 = time.perf_counter()
        for one in ids[:2]:
            model.generate(torch.tensor([one]), **kw)
        b1 = 2 * max_tokens / (time.perf_counter() - t0)
        width = max(len(x) for x in ids)
        batch = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        t0 = time.perf_counter()
        model.generate(batch, attention_mask=mask, **kw)
        b8 = len(ids) * max_tokens / (time.perf_counter() - t0)
    return {"batch1": b1, "batch8": b8}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from outrider.workers.config import ModelConfig
    from outrider.workers.models.loader import load_tokenizer

    tok = load_tokenizer(ModelConfig())
    ids = [
        list(
            tok.apply_chat_template(
                [{"role": "user", "content": p}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        )
        for p in PROMPTS
    ]
    ours = bench_outrider(ids, args.max_tokens)
    theirs = bench_transformers(ids, args.max_tokens, tok.pad_token_id or 0)
    print(f"threads={torch.get_num_threads()} max_tokens={args.max_tokens}")
    print(f"{'':14s}{'batch 1 tok/s':>16s}{'batch 8 tok/s':>16s}")
    print(f"{'outrider':14s}{ours['batch1']:16.1f}{ours['batch8']:16.1f}")
    print(f"{'transformers':14s}{theirs['batch1']:16.1f}{theirs['batch8']:16.1f}")


if __name__ == "__main__":
    main()
