"""`outrider train-drafter` and `outrider eval-drafter`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import msgspec
import yaml

from outrider.train.config import METHODS, TrainConfig
from outrider.workers.config import ConfigError

_FLAGS: dict[str, tuple[str, ...]] = {
    # flag dest -> path in TrainConfig
    "target": ("target",),
    "target_name": ("target_name",),
    "data_dir": ("data_dir",),
    "device": ("device",),
    "dtype": ("dtype",),
    "num_prompts": ("data", "num_prompts"),
    "prompt_file": ("data", "prompt_files"),
    "max_new_tokens": ("data", "max_new_tokens"),
    "max_num_seqs": ("data", "max_num_seqs"),
    "data_seed": ("data", "seed"),
    "num_layers": ("model", "num_layers"),
    "intermediate_size": ("model", "intermediate_size"),
    "draft_vocab_size": ("model", "draft_vocab_size"),
    "num_speculative_tokens": ("model", "num_speculative_tokens"),
    "steps": ("optim", "steps"),
    "lr": ("optim", "lr"),
    "batch_size": ("optim", "batch_size"),
    "max_seq_len": ("optim", "max_seq_len"),
    "checkpoint_every": ("optim", "checkpoint_every"),
    "seed": ("optim", "seed"),
    "max_train_seconds": ("optim", "max_seconds"),
    "max_data_seconds": ("data", "max_seconds"),
    "eval_prompts": ("eval_prompts",),
    "eval_max_tokens": ("eval_max_tokens",),
}


def add_train_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-drafter", help="train an EAGLE-3 / P-EAGLE / DFlash drafter")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--out", required=True, help="output directory (speculators checkpoint)")
    p.add_argument("--config", help="YAML/JSON file with TrainConfig keys; flags override it")
    p.add_argument("--target", help="target HF dir or .gguf (default: embedded SmolLM2)")
    p.add_argument("--target-name", help="verifier.name_or_path written into config.json")
    p.add_argument("--data-dir", help="data set directory, shared between methods")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float64"])
    p.add_argument("--num-prompts", type=int, help="Magpie prompts to generate")
    p.add_argument("--prompt-file", action="append", help="jsonl prompts (repeatable)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--max-num-seqs", type=int, help="batch of the data-generation engine")
    p.add_argument("--data-seed", type=int)
    p.add_argument("--num-layers", type=int)
    p.add_argument("--intermediate-size", type=int)
    p.add_argument("--draft-vocab-size", type=int)
    p.add_argument("--num-speculative-tokens", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-train-seconds", type=float, help="stop training (and export) after")
    p.add_argument("--max-data-seconds", type=float, help="stop answering prompts after")
    p.add_argument("--eval-prompts", type=int, help="held-out prompts to evaluate on (0: skip)")
    p.add_argument("--eval-max-tokens", type=int)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    e = sub.add_parser("eval-drafter", help="held-out acceptance and speed of a drafter")
    e.add_argument("--drafter", required=True, help="speculators-format drafter directory")
    e.add_argument("--target", help="target HF dir or .gguf (default: embedded SmolLM2)")
    e.add_argument("--device", default="auto")
    e.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="the target's and drafter's dtype (auto: float32 on CPU, bfloat16 on GPU)",
    )
    e.add_argument("--prompts", help="jsonl prompts (default: held-out Magpie prompts)")
    e.add_argument("--num-prompts", type=int, default=32)
    e.add_argument("--max-tokens", type=int, default=128)
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--num-speculative-tokens", type=int)
    e.add_argument("--data-seed", type=int, default=0)
    e.add_argument("--json", help="write the report here (default: <drafter>/eval.json)")
    e.set_defaults(func=cmd_eval)


def load_train_config(args: argparse.Namespace) -> TrainConfig:
    raw: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        raw.update(loaded)
    raw["method"] = args.method
    raw["out"] = args.out
    for dest, where in _FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        node = raw
        for key in where[:-1]:
            node = node.setdefault(key, {})
        node[where[-1]] = value
    try:
        cfg = msgspec.convert(raw, TrainConfig)
    except msgspec.ValidationError as e:
        raise ConfigError(f"train-drafter config: {e}") from None
    return cfg.validate()


def cmd_train(args: argparse.Namespace) -> int:
    from outrider.train.trainer import DrafterTrainer

    logging.getLogger("outrider.train").setLevel(logging.INFO)
    cfg = load_train_config(args)
    trainer = DrafterTrainer(cfg, progress=not args.no_progress)
    out = trainer.train()
    print(f"wrote {out}")
    if cfg.eval_prompts > 0:
        report = run_eval(
            out,
            target=cfg.target,
            device=cfg.device,
            num_prompts=cfg.eval_prompts,
            max_tokens=cfg.eval_max_tokens,
            data_seed=cfg.data.seed,
            plain=trainer.llm,
        )
        print(json.dumps(report))
    return 0


def heldout_prompt_ids(llm: Any, num_prompts: int, data_seed: int) -> list[list[int]]:
    from outrider.train.config import DataConfig
    from outrider.train.data import HELDOUT_TOPICS, magpie_prompts

    specs = magpie_prompts(llm, num_prompts, HELDOUT_TOPICS, DataConfig(), seed=data_seed + 1_000)
    return [llm.encode(s.text, chat=True) for s in specs]


def run_eval(
    drafter: Path,
    *,
    target: str | None,
    device: str,
    num_prompts: int,
    max_tokens: int,
    data_seed: int,
    prompts_file: str | None = None,
    batch_size: int = 1,
    num_speculative_tokens: int | None = None,
    plain: Any = None,
    report_path: Path | None = None,
    dtype: str = "auto",
) -> dict[str, Any]:
    from outrider.cluster.llm import LLM
    from outrider.train.card import refresh_card
    from outrider.train.data import file_prompts
    from outrider.train.evaluate import eval_config, evaluate

    base = plain or LLM(eval_config(target, device, None, 4, batch_size, dtype=dtype))
    if prompts_file:
        specs = file_prompts([prompts_file])[:num_prompts]
        prompts = [base.encode(s.text, chat=True) for s in specs]
        source = f"file {prompts_file}"
    else:
        prompts = heldout_prompt_ids(base, num_prompts, data_seed)
        source = (
            f"{len(prompts)} prompts written by the target (Magpie) over the held-out topic "
            f"list, seed {data_seed + 1_000} (training used seed {data_seed} and other topics)"
        )
    report = evaluate(
        drafter,
        prompts,
        target=target,
        device=device,
        max_tokens=max_tokens,
        batch_size=batch_size,
        num_speculative_tokens=num_speculative_tokens,
        prompt_source=source,
        plain=base,
        dtype=dtype,
    ).as_dict()
    path = report_path or Path(drafter) / "eval.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    refresh_card(Path(drafter))
    if not report["lossless"]:
        n = report["num_prompts"] - report["num_identical"]
        hint = ""
        if report["dtype"] in ("bfloat16", "float16"):
            hint = (
                f" (in {report['dtype']} a verify step and a decode step may round a near-tie "
                "differently; --dtype float32 checks losslessness)"
            )
        raise ConfigError(
            f"{drafter}: {n} of {report['num_prompts']} speculative outputs differ from plain "
            f"decoding{hint}"
        )
    return report


def cmd_eval(args: argparse.Namespace) -> int:
    report = run_eval(
        Path(args.drafter),
        target=args.target,
        device=args.device,
        num_prompts=args.num_prompts,
        max_tokens=args.max_tokens,
        data_seed=args.data_seed,
        prompts_file=args.prompts,
        batch_size=args.batch_size,
        num_speculative_tokens=args.num_speculative_tokens,
        report_path=Path(args.json) if args.json else None,
        dtype=args.dtype,
    )
    print(json.dumps(report))
    return 0
