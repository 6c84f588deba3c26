"""`outrider train-drafter` on a tiny target: training, export, loading, and agreement of the
trained network with the served drafter (same drafts from the same inputs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from outrider.cluster.config import OutriderConfig
from outrider.cluster.llm import LLM
from outrider.train import data as data_mod
from outrider.train.capture import TargetCapture
from outrider.train.config import ModelShape, OptimConfig, TrainConfig
from outrider.train.modules import DFlashDrafter, EagleDrafter
from outrider.train.trainer import DrafterTrainer
from outrider.workers.config import (
    CacheConfig,
    ConfigError,
    ModelConfig,
    SamplingParams,
    WorkerConfig,
)
from outrider.workers.proposers.base import ProposeItem
from outrider.workers.protocol import Delta
from outrider.workers.spec_config import SpeculativeConfig

K = 3
AUX = [1, 2, 3]


@pytest.fixture(scope="module")
def target(tiny_model: Any) -> Path:
    path, _ = tiny_model("llama", seed=5)
    return path


@pytest.fixture(scope="module")
def data_dir(target: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Responses of the target to random token prompts (the tiny model has no tokenizer)."""
    out = tmp_path_factory.mktemp("train-data")
    cfg = OutriderConfig(
        target=WorkerConfig(
            model=ModelConfig(path=str(target), dtype="float64"),
            cache=CacheConfig(num_blocks=256),
            device="cpu",
        )
    )
    llm = LLM(cfg)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 96, (8,), generator=g).tolist() for _ in range(24)]
    params = [
        SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, max_tokens=40, ignore_eos=True)
        for i in range(len(prompts))
    ]
    results = llm.generate(prompts, params)
    samples = [
        data_mod.Sample(r.prompt_token_ids, r.token_ids, "", "random", i % 2 == 1)
        for i, r in enumerate(results)
    ]
    data_mod.save_samples(out / "train.jsonl", samples)
    return out


def train_config(method: str, target: Path, data_dir: Path, out: Path, **optim: Any) -> TrainConfig:
    o = dict(
        steps=60,
        batch_size=4,
        max_seq_len=48,
        warmup_steps=5,
        lr=3e-3,
        checkpoint_every=30,
        dflash_anchors=8,
    )
    o.update(optim)
    return TrainConfig(
        method=method,  # type: ignore[arg-type]
        out=str(out),
        target=str(target),
        data_dir=str(data_dir),
        device="cpu",
        dtype="float64",
        model=ModelShape(draft_vocab_size=64, num_speculative_tokens=K, aux_layer_ids=AUX),
        optim=OptimConfig(**o),
        eval_prompts=0,
    )


def served(target: Path, drafter: Path, *, parallel: bool | None = None) -> LLM:
    spec = SpeculativeConfig(
        model=str(drafter),
        num_speculative_tokens=K,
        parallel_drafting=parallel,
        verification="strict",
        dtype="float64",
        cache=CacheConfig(num_blocks=256),
        device="cpu",
    )
    cfg = OutriderConfig(
        target=WorkerConfig(
            model=ModelConfig(path=str(target), dtype="float64"),
            cache=CacheConfig(num_blocks=256),
            device="cpu",
        ),
        speculative=spec,
    )
    return LLM(cfg)


def load_exported(model: torch.nn.Module, out: Path) -> None:
    """Give the training network the exported (bf16-rounded) weights, as the server sees them."""
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k).to(torch.float64) for k in f.keys() if k not in ("d2t", "t2d")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and all(k.startswith("embed_tokens") for k in missing)


def training_drafts(
    trainer: DrafterTrainer, tokens: list[int], n: int, drafts: list[int]
) -> list[int]:
    """What the training network predicts at each draft position when the earlier drafts are
    the served ones: the sequence is tokens[:n+1] (bonus at n) followed by ``drafts``."""
    model = trainer.model
    kept = trainer.draft_vocab.kept
    seq = tokens[: n + 1] + drafts
    cap = TargetCapture(trainer.runner, trainer.aux_layer_ids, kept)
    batch = cap([seq], torch.device("cpu"))
    # NOTE: the target hidden rows only exist up to the bonus token in serving; positions past
    # n feed no target features in any method (EAGLE-3 feeds back, the others use masks).
    model.eval()
    with torch.no_grad():
        if isinstance(model, DFlashDrafter):
            from outrider.train.modules import block_mask

            a = torch.tensor([[n]])
            ids = torch.tensor([[seq[n]] + [trainer.mask_token_id] * K])
            pos = torch.arange(n, n + K + 1)[None]
            mask = block_mask(a, n + 1 + K, K + 1, causal=False)
            aux = batch.aux[:, : n + 1 + K]
            logits = model(aux, ids, pos, mask)[0, 1:]  # [K, Vd]
            return kept[logits.argmax(-1)].tolist()
        assert isinstance(model, EagleDrafter)
        from outrider.train.modules import chain_mask, parallel_chain_mask

        t = n  # hidden rows 0..n-1; row n-1 carries the bonus token
        ids0 = torch.tensor([seq[1 : n + 1]])
        hidden = model.fuse(batch.aux[:, :t])
        i = torch.arange(t)[None]
        if model.mask_hidden is not None:
            mfused = model.fuse(model.mask_hidden)
            idsm = torch.full((1, t), trainer.mask_token_id)
            ids = torch.cat([ids0] + [idsm] * (K - 1), dim=1)
            hid = torch.cat([hidden] + [mfused.expand(1, t, -1)] * (K - 1), dim=1)
            pos = torch.cat([i + d for d in range(K)], dim=1)
            logits, _, _ = model.step(ids, hid, pos, parallel_chain_mask(t, K, i.device)[None])
            rows = [d * t + t - 1 for d in range(K)]
            return kept[logits[0, rows].argmax(-1)].tolist()
        out: list[int] = []
        past: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in model.layers]
        for s in range(K):
            ids = torch.tensor([seq[1 + s : n + 1 + s]])
            logits, hidden, kvs = model.step(
                ids, hidden, i + s, chain_mask(t, s, i.device)[None], past
            )
            for lp, kv in zip(past, kvs, strict=True):
                lp.append(kv)
            out.append(int(kept[logits[0, t - 1].argmax()]))
        return out


@pytest.mark.parametrize("method", ["eagle3", "peagle", "dflash"])
def test_train_export_load_and_agree(
    method: str, target: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / method
    trainer = DrafterTrainer(train_config(method, target, data_dir, out), progress=False)
    trainer.train()

    run = json.loads((out / "run.json").read_text())
    losses = [r["loss"] for r in run["log"]]
    assert losses[-1] < 0.8 * losses[0], losses
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| steps | 60 |" in (out / "README.md").read_text()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["speculators_model_type"] == method
    assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == K
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("d2t").dtype == torch.int64
        assert f.get_tensor("t2d").dtype == torch.bool
        assert f.get_tensor("fc.weight").dtype == torch.bfloat16
    assert not any(n.startswith("embed_tokens") for n in names)
    assert ("mask_hidden" in names) == (method == "peagle")

    load_exported(trainer.model, out)
    llm = served(target, out)
    assert llm.drafter is not None and llm.drafter.capabilities.parallel_drafting == (
        method != "eagle3"
    )
    samples = data_mod.load_samples(data_dir / "train.jsonl")
    checked = 0
    for sid, sample in enumerate(samples[:4]):
        tokens = sample.token_ids
        for n in (6, 17):
            cap = TargetCapture(llm.runner, trainer.aux_layer_ids, trainer.draft_vocab.kept)
            batch = cap([tokens[: n + 1]], torch.device("cpu"))
            item = ProposeItem(
                delta=Delta(1000 + sid * 100 + n, 0, tokens[: n + 1]),
                num_draft=K,
                hidden_states=batch.aux[0, :n].to(torch.float64),
            )
            drafts = llm.drafter.propose([item], "parallel").draft_token_ids[0]
            llm.drafter.release([item.delta.seq_id])
            assert len(drafts) == K
            assert training_drafts(trainer, tokens, n, drafts) == drafts
            checked += 1
    assert checked == 8

    # Serving with the trained head is lossless, as with any drafter.
    prompts = [s.prompt_token_ids for s in samples[:3]]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = LLM(
        OutriderConfig(
            target=WorkerConfig(
                model=ModelConfig(path=str(target), dtype="float64"),
                cache=CacheConfig(num_blocks=256),
                device="cpu",
            )
        )
    )
    ref = [r.token_ids for r in plain.generate(prompts, params)]
    got = llm.generate(prompts, params)
    assert [r.token_ids for r in got] == ref
    assert sum(r.spec.num_drafts for r in got) > 0


def test_resume_extends_and_refuses_other_settings(
    target: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "resume"
    DrafterTrainer(
        train_config("eagle3", target, data_dir, out, steps=20, checkpoint_every=10), progress=False
    ).train()
    first = json.loads((out / "run.json").read_text())["log"]
    assert first[-1]["step"] == 20
    DrafterTrainer(
        train_config("eagle3", target, data_dir, out, steps=30, checkpoint_every=10), progress=False
    ).train()
    log = json.loads((out / "run.json").read_text())["log"]
    assert [r["step"] for r in log] == [10, 20, 30]
    assert log[:2] == first
    with pytest.raises(ConfigError, match="other settings"):
        DrafterTrainer(
            train_config("eagle3", target, data_dir, out, steps=40, lr=1e-4), progress=False
        ).train()
