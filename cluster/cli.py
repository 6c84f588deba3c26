"""``outrider`` command line: generate, serve, bench, bench-kernels, train-drafter, eval-drafter.

Every user error is one line on stderr naming what was wrong, and a non-zero exit; no
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from outrider.cluster.config import ConfigError, load_config
from outrider.workers.config import SamplingParams

EXIT_USAGE = 2


class CliError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(message)


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--prompt-ids must be comma-separated integers, got {text!r}"
        ) from None


def _speculative_arg(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--speculative-config is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError("--speculative-config must be a JSON object")
    return data


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text in this process")
    p.add_argument("--model", help="HF model dir or .gguf file (default: embedded SmolLM2)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", type=_csv_ints, help="prompt token ids, e.g. 1,2,3")
    p.add_argument("--chat", action="store_true", help="apply the chat template to --prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--config", help="YAML/JSON config file (outrider schema)")
    p.add_argument(
        "--speculative-config",
        type=_speculative_arg,
        help="JSON object, same shape as vLLM's --speculative-config",
    )
    p.add_argument(
        "--no-speculation",
        action="store_true",
        help="plain decoding (by default the embedded model speculates with its shipped drafter)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=cmd_generate)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    model: dict[str, Any] = {}
    if args.model is not None:
        model["path"] = args.model
    if args.dtype is not None:
        model["dtype"] = args.dtype
    out: dict[str, Any] = {"target": {"model": model}} if model else {}
    if args.speculative_config is not None:
        if args.no_speculation:
            raise CliError("--no-speculation and --speculative-config contradict each other")
        out["speculative"] = args.speculative_config
    elif args.config is None and args.model is None and not args.no_speculation:
        from outrider.cluster.default_drafter import default_speculative

        spec = default_speculative()
        if spec is not None:
            out["speculative"] = spec
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    from outrider.cluster.llm import LLM

    if args.prompt is None and args.prompt_ids is None:
        raise CliError("give --prompt TEXT or --prompt-ids 1,2,3")
    if args.chat and args.prompt is None:
        raise CliError("--chat applies to --prompt, not --prompt-ids")
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=list(args.stop),
        ignore_eos=args.ignore_eos,
    )
    params.validate()
    cfg = load_config(args.config, _overrides(args))
    llm = LLM(cfg)
    prompt: str | list[int] = args.prompt if args.prompt is not None else args.prompt_ids
    out = llm.generate([prompt], params, chat=args.chat)[0]  # type: ignore[list-item]
    if args.json:
        record: dict[str, Any] = {
            "token_ids": out.token_ids,
            "text": out.text,
            "finish_reason": out.finish_reason,
            "prompt_tokens": out.prompt_tokens,
        }
        if llm.spec is not None and llm.drafter is not None:
            record["spec"] = spec_record(llm, out.spec)
        print(json.dumps(record))
    else:
        print(out.text)
    return 0


def spec_record(llm: Any, stats: Any) -> dict[str, Any]:
    caps = llm.drafter.capabilities
    return {
        "method": llm.spec.method,
        "num_speculative_tokens": llm.spec.num_speculative_tokens,
        "parallel_drafting": caps.parallel_drafting,
        "fallback_reason": caps.fallback_reason,
        "synthetic": llm.spec.verification == "synthetic",
        "num_drafts": stats.num_drafts,
        "num_draft_tokens": stats.num_draft_tokens,
        "num_accepted_tokens": stats.num_accepted_tokens,
        "accepted_per_position": stats.accepted_per_position,
        "acceptance_length": stats.acceptance_length,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="outrider", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    _add_generate(sub)
    import outrider.cluster.bench  # noqa: F401
    import outrider.cluster.bench_kernels  # noqa: F401
    from outrider.cluster.serve import add_serve_parser

    add_serve_parser(sub)
    # NOTE: outrider.train sits above cluster (it drives the engine); imported only here.
    from outrider.train.cli import add_train_parsers

    add_train_parsers(sub)
    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return parser


# Other modules add their subcommands here (serve, bench), keeping this file small.
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def _user_errors() -> tuple[type[BaseException], ...]:
    from outrider.kernels.registry import BackendError

    errors: list[type[BaseException]] = [CliError, ConfigError, BackendError]
    try:
        from outrider.workers.models.loader import ModelLoadError

        errors.append(ModelLoadError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("OUTRIDER_LOG_LEVEL", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_USAGE
        return int(args.func(args))
    except _user_errors() as e:
        print(f"outrider: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except msgspec.ValidationError as e:
        print(f"outrider: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # NOTE: `python -m` runs this file as __main__; subcommands register on the imported module.
    from outrider.cluster.cli import main as _main

    sys.exit(_main())
