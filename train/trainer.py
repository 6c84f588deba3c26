"""`outrider train-drafter`: data → draft vocabulary → training → speculators export → card.

Every stage is resumable: the data set and the draft vocabulary are files under ``data_dir``
(shared by the methods of one target), and the training state (weights, optimizer, step, loss
log) is checkpointed atomically under ``<out>/checkpoint``; a rerun with the same settings picks
up where the last one stopped, and a larger ``optim.steps`` extends a finished run.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import torch

from outrider.cluster.config import OutriderConfig, SchedulerConfig
from outrider.cluster.llm import LLM
from outrider.train import data as data_mod
from outrider.train.capture import TargetCapture
from outrider.train.card import write_card
from outrider.train.config import TrainConfig
from outrider.train.export import build_config, save_drafter
from outrider.train.modules import DFlashDrafter, DraftShape, EagleDrafter
from outrider.train.objectives import (
    StepResult,
    dflash_step,
    eagle3_step,
    peagle_step,
    sample_anchors,
)
from outrider.train.vocab import DraftVocab, build_draft_vocab, count_tokens
from outrider.workers.config import CacheConfig, ConfigError, ModelConfig, WorkerConfig
from outrider.workers.layers.rotary import rope_config
from outrider.workers.models.target_tensors import read_target_tensors

logger = logging.getLogger(__name__)

LOG_EVERY = 10


@dataclass
class LogRow:
    step: int
    loss: float
    kl: list[float]
    accuracy: list[float]
    acceptance_length: float
    lr: float
    seconds: float


@dataclass
class TrainState:
    step: int = 0
    log: list[LogRow] = field(default_factory=list)
    seconds: float = 0.0


def target_llm(cfg: TrainConfig, max_tokens_in_flight: int) -> LLM:
    """The target on outrider's engine, with a KV cache sized for data generation and capture."""
    device = cfg.device
    dtype = "auto" if cfg.dtype == "auto" else cfg.dtype
    block = 16
    blocks = max(64, math.ceil(max_tokens_in_flight * 1.25 / block))
    target = WorkerConfig(
        model=ModelConfig(path=cfg.target, dtype=dtype),
        cache=CacheConfig(block_size=block, num_blocks=blocks),
        device=device,
    )
    sched = SchedulerConfig(
        max_num_seqs=cfg.data.max_num_seqs,
        max_num_batched_tokens=max(8192, cfg.optim.batch_size * cfg.optim.max_seq_len),
    )
    return LLM(OutriderConfig(target=target, scheduler=sched))


def draft_shape(cfg: TrainConfig, hf: Any, vocab: DraftVocab, num_aux: int) -> DraftShape:
    heads = int(hf.num_attention_heads)
    head_dim = int(getattr(hf, "head_dim", None) or hf.hidden_size // heads)
    theta, scaling = rope_config(hf)
    rope = {"rope_theta": theta, "rope_parameters": {**scaling, "rope_theta": theta}}
    return DraftShape(
        hidden_size=int(hf.hidden_size),
        intermediate_size=int(cfg.model.intermediate_size or hf.intermediate_size),
        num_heads=heads,
        num_kv_heads=int(hf.num_key_value_heads),
        head_dim=head_dim,
        num_layers=cfg.num_layers,
        rms_norm_eps=float(hf.rms_norm_eps),
        vocab_size=int(hf.vocab_size),
        draft_vocab_size=vocab.draft_vocab_size,
        num_aux=num_aux,
        max_position_embeddings=int(hf.max_position_embeddings),
        rope=rope,
    )


def pick_mask_token(tokenizer: Any, counts: torch.Tensor) -> int:
    """The tokenizer's mask token, else the lowest-id special token never seen in the data,
    else the rarest token."""
    if tokenizer is not None:
        mid = getattr(tokenizer, "mask_token_id", None)
        if isinstance(mid, int):
            return mid
        specials = sorted(set(getattr(tokenizer, "all_special_ids", []) or []))
        added = sorted(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        for tid in sorted(set(specials) | set(added)):
            if 0 <= tid < counts.numel() and int(counts[tid]) == 0:
                return int(tid)
    return int(torch.argmin(counts))


class DrafterTrainer:
    def __init__(self, cfg: TrainConfig, *, progress: bool = True) -> None:
        self.cfg = cfg.validate()
        self.out = Path(cfg.out)
        self.data_dir = Path(cfg.data_dir) if cfg.data_dir else self.out / "data"
        self.progress = progress
        in_flight = max(
            cfg.data.max_num_seqs * (cfg.data.max_prompt_tokens + cfg.data.max_new_tokens + 64),
            cfg.optim.batch_size * cfg.optim.max_seq_len,
        )
        self.llm = target_llm(cfg, in_flight)
        self.runner = self.llm.runner
        self.device = self.runner.device
        hf = self.runner.hf_config
        n = int(hf.num_hidden_layers)
        ids = cfg.model.aux_layer_ids or [2, n // 2, n - 3]
        bad = [i for i in ids if not 0 <= i <= n]
        if bad:
            raise ConfigError(f"`model.aux_layer_ids` entry {bad[0]} is outside [0, {n}]")
        self.aux_layer_ids = sorted(set(ids))

    # -- stages -----------------------------------------------------------------------------
    def samples(self) -> list[data_mod.Sample]:
        path = self.data_dir / "train.jsonl"
        if path.is_file():
            return data_mod.load_samples(path)
        t0 = time.perf_counter()
        samples = data_mod.build_samples(self.llm, self.cfg.data)
        if not samples:
            raise ConfigError("no training samples: set data.num_prompts or data.prompt_files")
        data_mod.save_samples(path, samples)
        tokens = sum(len(s.output_token_ids) for s in samples)
        logger.info(
            "generated %d samples (%d response tokens) in %.0f s",
            len(samples),
            tokens,
            time.perf_counter() - t0,
        )
        return samples

    def vocab(self, samples: list[data_mod.Sample]) -> tuple[DraftVocab, torch.Tensor]:
        vt = int(self.runner.hf_config.vocab_size)
        counts = count_tokens([s.output_token_ids for s in samples], vt)
        return build_draft_vocab(counts, min(self.cfg.model.draft_vocab_size, vt)), counts

    def build_model(self, shape: DraftShape, vocab: DraftVocab) -> torch.nn.Module:
        torch.manual_seed(self.cfg.optim.seed)
        model: torch.nn.Module
        if self.cfg.method == "dflash":
            model = DFlashDrafter(shape)
        else:
            model = EagleDrafter(shape, parallel=self.cfg.method == "peagle")
        shared = read_target_tensors(self.cfg.target, ["embed_tokens", "lm_head"])
        embed = shared["embed_tokens"].float()
        head = shared.get("lm_head", embed).float()
        with torch.no_grad():
            model.embed_tokens.weight.copy_(embed)
            model.lm_head.weight.copy_(head[vocab.kept])
        return model.to(self.device)

    # -- training ---------------------------------------------------------------------------
    def _batches(self, seqs: list[list[int]], step: int) -> list[list[int]]:
        """The sequences of a step: a seeded permutation per epoch, so a resume is exact."""
        bs = self.cfg.optim.batch_size
        per_epoch = max(len(seqs) // bs, 1)
        epoch, idx = divmod(step, per_epoch)
        order = list(range(len(seqs)))
        random.Random(self.cfg.optim.seed * 7_919 + epoch).shuffle(order)
        pick = order[idx * bs : idx * bs + bs] or order[:bs]
        return [seqs[i] for i in pick]

    def _lr(self, step: int) -> float:
        o = self.cfg.optim
        if step < o.warmup_steps:
            return o.lr * (step + 1) / o.warmup_steps
        frac = (step - o.warmup_steps) / max(o.steps - o.warmup_steps, 1)
        return o.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    def _step(
        self,
        model: torch.nn.Module,
        capture: TargetCapture,
        kept: torch.Tensor,
        seqs: list[list[int]],
        mask_token_id: int,
        gen: torch.Generator,
    ) -> StepResult:
        cfg = self.cfg
        k = cfg.model.num_speculative_tokens
        batch = capture(seqs, self.device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            if cfg.method == "eagle3":
                assert isinstance(model, EagleDrafter)
                return eagle3_step(model, batch, kept, k, cfg.optim.step_decay)
            if cfg.method == "peagle":
                assert isinstance(model, EagleDrafter)
                return peagle_step(model, batch, kept, k, mask_token_id, cfg.optim.step_decay)
            assert isinstance(model, DFlashDrafter)
            anchors = sample_anchors(batch.lengths, cfg.optim.dflash_anchors, gen)
            return dflash_step(
                model, batch, kept, k + 1, mask_token_id, anchors, False, cfg.optim.step_decay
            )

    def train(self) -> Path:
        cfg = self.cfg
        samples = self.samples()
        vocab, counts = self.vocab(samples)
        mask_token_id = pick_mask_token(self.llm.tokenizer, counts)
        shape = draft_shape(cfg, self.runner.hf_config, vocab, len(self.aux_layer_ids))
        model = self.build_model(shape, vocab)
        self.model, self.draft_vocab, self.mask_token_id = model, vocab, mask_token_id
        kept = vocab.kept.to(self.device)
        capture = TargetCapture(self.runner, self.aux_layer_ids, vocab.kept)
        seqs = [s.token_ids[: cfg.optim.max_seq_len] for s in samples]
        seqs = [s for s in seqs if len(s) >= 4]
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        state = self._resume(model, opt)
        gen = torch.Generator().manual_seed(cfg.optim.seed + state.step)
        bar = _progress(cfg.optim.steps, state.step, self.progress, cfg.method)
        t_start = time.perf_counter() - state.seconds
        window: list[StepResult] = []
        model.train()
        run_start = time.perf_counter()
        while state.step < cfg.optim.steps:
            if (
                cfg.optim.max_seconds is not None
                and time.perf_counter() - run_start > cfg.optim.max_seconds
            ):
                logger.info("%s: time budget reached at step %d", cfg.method, state.step)
                state.seconds = time.perf_counter() - t_start
                self._checkpoint(model, opt, state)
                break
            lr = self._lr(state.step)
            for g in opt.param_groups:
                g["lr"] = lr
            res = self._step(
                model, capture, kept, self._batches(seqs, state.step), mask_token_id, gen
            )
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            opt.step()
            state.step += 1
            window.append(_detach(res))
            if state.step % LOG_EVERY == 0 or state.step == cfg.optim.steps:
                row = _summarize(window, state.step, lr, time.perf_counter() - t_start)
                state.log.append(row)
                window = []
                bar.set_postfix(loss=f"{row.loss:.3f}", al=f"{row.acceptance_length:.2f}")
                if not self.progress and state.step % (LOG_EVERY * 10) == 0:
                    logger.info(
                        "%s step %d loss %.4f acc %s al %.3f (%.0f s)",
                        cfg.method,
                        row.step,
                        row.loss,
                        [round(a, 3) for a in row.accuracy],
                        row.acceptance_length,
                        row.seconds,
                    )
            bar.update(1)
            if state.step % cfg.optim.checkpoint_every == 0 or state.step == cfg.optim.steps:
                state.seconds = time.perf_counter() - t_start
                self._checkpoint(model, opt, state)
        bar.close()
        config = build_config(
            cfg.method,
            shape,
            num_speculative_tokens=cfg.model.num_speculative_tokens,
            aux_layer_ids=self.aux_layer_ids,
            verifier=cfg.target_name or cfg.target,
            verifier_architectures=list(
                getattr(self.runner.hf_config, "architectures", None) or ["LlamaForCausalLM"]
            ),
            mask_token_id=mask_token_id if cfg.method != "eagle3" else None,
        )
        export = model.export_state()  # type: ignore[operator]
        size = save_drafter(self.out, export, vocab, config)
        write_card(
            self.out,
            cfg,
            state,
            samples=samples,
            vocab=vocab,
            counts=counts,
            size_bytes=size,
            mask_token_id=mask_token_id,
        )
        return self.out

    # -- checkpoints ------------------------------------------------------------------------
    def _ckpt_path(self) -> Path:
        return self.out / "checkpoint" / "state.pt"

    def _checkpoint(
        self, model: torch.nn.Module, opt: torch.optim.Optimizer, s: TrainState
    ) -> None:
        path = self._ckpt_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "config": msgspec.json.encode(self._resume_key()).decode(),
            "model": {k: v for k, v in model.state_dict().items() if not k.startswith("embed_")},
            "optimizer": opt.state_dict(),
            "step": s.step,
            "seconds": s.seconds,
            "log": [dict(r.__dict__) for r in s.log],
        }
        tmp = path.with_suffix(".tmp")
        torch.save(blob, tmp)
        tmp.replace(path)

    def _resume_key(self) -> dict[str, Any]:
        """Settings a resumed run must share with the one that wrote the checkpoint."""
        d = msgspec.to_builtins(self.cfg)
        d["optim"].pop("steps", None)
        d["optim"].pop("checkpoint_every", None)
        d["optim"].pop("max_seconds", None)
        d["data"].pop("max_seconds", None)
        for k in ("eval_prompts", "eval_max_tokens", "device", "out", "data_dir"):
            d.pop(k, None)
        return d

    def _resume(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> TrainState:
        path = self._ckpt_path()
        if not path.is_file():
            return TrainState()
        blob = torch.load(path, map_location=self.device, weights_only=False)
        key = msgspec.json.encode(self._resume_key()).decode()
        if blob["config"] != key:
            raise ConfigError(
                f"{path} was written by a run with other settings; use another --out or remove it"
            )
        missing, unexpected_keys = model.load_state_dict(blob["model"], strict=False)
        bad = [k for k in missing if not k.startswith("embed_")] + list(unexpected_keys)
        if bad:
            raise ConfigError(f"{path} does not match this model: {bad[:3]}")
        opt.load_state_dict(blob["optimizer"])
        log = [LogRow(**r) for r in blob["log"]]
        logger.info("resuming %s at step %d", self.cfg.method, blob["step"])
        return TrainState(step=int(blob["step"]), log=log, seconds=float(blob["seconds"]))


def _detach(res: StepResult) -> StepResult:
    return StepResult(res.loss.detach(), res.kl, res.accuracy, res.rows)


def _summarize(window: list[StepResult], step: int, lr: float, seconds: float) -> LogRow:
    n = len(window)
    width = max(len(r.kl) for r in window)
    kl = [sum(r.kl[i] for r in window if i < len(r.kl)) / n for i in range(width)]
    acc = [sum(r.accuracy[i] for r in window if i < len(r.accuracy)) / n for i in range(width)]
    loss = float(torch.stack([r.loss for r in window]).mean())
    return LogRow(step, loss, kl, acc, 1.0 + sum(acc), lr, seconds)


class _Quiet:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return _Quiet()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"train {desc}", unit="step")
