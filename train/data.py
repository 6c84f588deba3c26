"""Self-distillation data: Magpie-style prompts written by the target, answered by the target.

A Magpie prompt is what the target writes when it is given the chat template up to the start of
a user turn: it plays the user. A topic in the system turn steers each prompt, so the set covers
many subjects; the answers are then generated with the ordinary chat template (no system turn,
as clients send them). Both passes run on outrider's own engine (``LLM.generate``). Prompt files
(jsonl) can add or replace generated prompts. Held-out prompts use a different topic list and seed.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from outrider.cluster.llm import LLM
from outrider.train.config import DataConfig
from outrider.workers.config import ConfigError, SamplingParams

TRAIN_TOPICS: tuple[str, ...] = (
    "cooking and recipes",
    "personal finance",
    "python programming",
    "world history",
    "physics",
    "biology",
    "travel planning",
    "fitness and exercise",
    "mental health",
    "writing emails",
    "job interviews",
    "gardening",
    "astronomy",
    "music theory",
    "learning languages",
    "mathematics homework",
    "climate and weather",
    "pets and animals",
    "home repair",
    "philosophy",
    "economics",
    "chemistry",
    "movies and books",
    "productivity",
    "parenting",
    "nutrition",
    "geography",
    "computer hardware",
    "web development",
    "data science",
    "poetry",
    "small business",
    "car maintenance",
    "relationships",
    "sports rules",
    "art history",
    "environmental science",
    "law basics",
    "space exploration",
    "trivia questions",
    "story writing",
    "summarizing a text",
    "explaining a concept to a child",
    "comparing two things",
    "making a plan",
)
# NOTE: disjoint from TRAIN_TOPICS; used with a different seed for held-out evaluation.
HELDOUT_TOPICS: tuple[str, ...] = (
    "ancient civilizations",
    "marine biology",
    "photography",
    "board games",
    "architecture",
    "meditation",
    "electric vehicles",
    "volcanoes",
    "baking bread",
    "public speaking",
    "chess strategy",
    "birds",
    "video game design",
    "first aid",
    "renewable energy",
    "fashion",
)

MAGPIE_SYSTEM = "You are a helpful AI assistant. The user is asking you about {topic}."


class Sample(msgspec.Struct, frozen=True):
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    prompt: str
    topic: str
    greedy: bool

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids


@dataclass(frozen=True)
class PromptSpec:
    text: str
    topic: str


def pre_query_ids(tokenizer: Any, system: str) -> list[int]:
    """Token ids of the chat template up to (and including) the opening of a user turn."""
    mark = "\u2063MAGPIE\u2063"
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": mark}],
        tokenize=False,
        add_generation_prompt=False,
    )
    if mark not in text:
        raise ConfigError("the target's chat template does not render the user message verbatim")
    prefix = text[: text.index(mark)]
    return [int(i) for i in tokenizer(prefix, add_special_tokens=False)["input_ids"]]


def _end_of_turn_ids(llm: LLM) -> list[int]:
    tok = llm.tokenizer
    ids: list[int] = []
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tok.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid >= 0:
            ids.append(tid)
    if tok.eos_token_id is not None:
        ids.append(int(tok.eos_token_id))
    return sorted(set(ids))


def magpie_prompts(
    llm: LLM, num_prompts: int, topics: Sequence[str], cfg: DataConfig, *, seed: int
) -> list[PromptSpec]:
    """``num_prompts`` user prompts written by the target, cycling over ``topics``."""
    if llm.tokenizer is None:
        raise ConfigError("Magpie prompts need a target with a tokenizer and a chat template")
    if num_prompts == 0:
        return []
    rng = random.Random(seed)
    chosen = [topics[i % len(topics)] for i in range(num_prompts)]
    rng.shuffle(chosen)
    stops = _end_of_turn_ids(llm)
    prefixes = {t: pre_query_ids(llm.tokenizer, MAGPIE_SYSTEM.format(topic=t)) for t in topics}
    out: list[PromptSpec] = []
    need = chosen
    attempt = 0
    while need and attempt < 4:
        params = [
            SamplingParams(
                temperature=1.0,
                top_p=0.95,
                max_tokens=cfg.max_prompt_tokens,
                stop_token_ids=stops,
                seed=seed * 1_000_003 + attempt * 100_003 + i,
            )
            for i in range(len(need))
        ]
        results = llm.generate([prefixes[t] for t in need], params)
        retry: list[str] = []
        for topic, res in zip(need, results, strict=True):
            text = res.text.strip()
            # NOTE: a prompt cut by max_tokens or too short to be a question is written again.
            if res.finish_reason == "stop" and len(text) >= 12:
                out.append(PromptSpec(text, topic))
            else:
                retry.append(topic)
        need = retry
        attempt += 1
    return out


def file_prompts(paths: Sequence[str]) -> list[PromptSpec]:
    """Prompts from jsonl files: ``{"prompt": str}`` or ``{"messages": [{"role", "content"}]}``
    (the first user message is taken)."""
    out: list[PromptSpec] = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"prompt file {path} does not exist")
        for n, line in enumerate(p.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON: {e}") from None
            text = _prompt_of(row)
            if text is None:
                raise ConfigError(
                    f'{path}:{n}: expected {{"prompt": str}} or {{"messages": [...]}} '
                    "with a user message"
                )
            out.append(PromptSpec(text, p.stem))
    return out


def _prompt_of(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    for m in row.get("messages") or []:
        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    return None


def respond(llm: LLM, prompts: Sequence[PromptSpec], cfg: DataConfig, *, seed: int) -> list[Sample]:
    """The target's answers to ``prompts`` (chat template), greedy for a fixed fraction."""
    rng = random.Random(seed + 7)
    greedy = [rng.random() < cfg.greedy_fraction for _ in prompts]
    params = [
        SamplingParams(
            temperature=0.0 if g else cfg.temperature,
            max_tokens=cfg.max_new_tokens,
            seed=None if g else seed * 7_919 + i,
        )
        for i, g in enumerate(greedy)
    ]
    ids = [llm.encode(p.text, chat=True) for p in prompts]
    out: list[Sample] = []
    t0 = time.perf_counter()
    chunk = max(cfg.max_num_seqs * 2, 1)
    for lo in range(0, len(prompts), chunk):
        if cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds:
            break
        hi = lo + chunk
        results = llm.generate(ids[lo:hi], params[lo:hi])
        out += [
            Sample(res.prompt_token_ids, res.token_ids, p.text, p.topic, g)
            for p, res, g in zip(prompts[lo:hi], results, greedy[lo:hi], strict=True)
            if res.token_ids
        ]
    return out


def build_samples(
    llm: LLM, cfg: DataConfig, *, heldout: bool = False, num: int | None = None
) -> list[Sample]:
    topics = list(cfg.topics) or list(HELDOUT_TOPICS if heldout else TRAIN_TOPICS)
    seed = cfg.seed + (1_000 if heldout else 0)
    prompts = [] if heldout else file_prompts(cfg.prompt_files)
    n = cfg.num_prompts if num is None else num
    prompts += magpie_prompts(llm, n, topics, cfg, seed=seed)
    return respond(llm, prompts, cfg, seed=seed)


def save_samples(path: Path, samples: Sequence[Sample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    enc = msgspec.json.Encoder()
    with tmp.open("wb") as f:
        for s in samples:
            f.write(enc.encode(s) + b"\n")
    tmp.replace(path)


def load_samples(path: Path) -> list[Sample]:
    dec = msgspec.json.Decoder(Sample)
    return [dec.decode(line) for line in path.read_bytes().splitlines() if line.strip()]


def iter_token_ids(samples: Sequence[Sample]) -> Iterator[list[int]]:
    for s in samples:
        yield s.token_ids
