"""The whole stack: Ray Serve router + target and drafter actor groups + HTTP, openai SDK."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from safetensors.torch import save_file

from outrider.cluster.config import load_config
from outrider.cluster.llm import EMBEDDED_MODEL_NAME, LLM
from outrider.workers.config import SamplingParams

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

API_KEY = "serve-test-key"
PROMPTS = [
    "Name three colors.",
    "What is 2+2?",
    "Repeat: red blue red blue red blue",
    "Say hello in French.",
]


@pytest.fixture(scope="module")
def cluster(free_port: Callable[[], int]) -> Iterator[int]:
    ray.init(
        _node_ip_address="127.0.0.1",
        num_cpus=8,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


def _client(port: int, name: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/{name}/v1", api_key=API_KEY, max_retries=0
    )


@pytest.fixture(scope="module")
def default_app(cluster: int, deploy_router: Any) -> Iterator[tuple[openai.OpenAI, Any, str]]:
    cfg = load_config(
        None,
        {
            "speculative": {
                "method": "ngram",
                "num_speculative_tokens": 3,
                "prompt_lookup_min": 2,
                "device": "cpu",
            },
            "target": {"model": {"dtype": "float32"}, "device": "cpu"},
            "server": {"api_key": API_KEY},
        },
    )
    handle = deploy_router("smol", cfg)
    yield _client(cluster, "smol"), handle, f"http://127.0.0.1:{cluster}/smol"
    serve.delete("smol")


@pytest.fixture(scope="module")
def in_process() -> LLM:
    return LLM(load_config(None, {"target": {"model": {"dtype": "float32"}}}))


def _chat(client: openai.OpenAI, prompt: str, stream: bool, max_tokens: int = 24) -> str:
    kw: dict[str, Any] = {
        "model": EMBEDDED_MODEL_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    if not stream:
        return client.chat.completions.create(**kw).choices[0].message.content or ""
    parts = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


def test_served_text_equals_in_process_generate(default_app, in_process: LLM) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = default_app
    params = SamplingParams(temperature=0.0, max_tokens=24)
    for prompt in PROMPTS[:2]:
        want = in_process.generate([prompt], params, chat=True)[0].text
        assert _chat(client, prompt, stream=False) == want
        assert _chat(client, prompt, stream=True) == want


def test_sixteen_concurrent_streams_equal_their_solo_output(default_app) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = default_app
    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(16)]
    solo = {p: _chat(client, p, stream=False, max_tokens=16) for p in prompts[:4]}
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda p: _chat(client, p, True, 16), prompts))
    assert all(outs)
    for p, out in zip(prompts[:4], outs[:4], strict=True):
        assert out == solo[p]
    again = [_chat(client, p, stream=False, max_tokens=16) for p in prompts[4:8]]
    assert again == outs[4:8]


@pytest.mark.parametrize(
    ("body", "headers", "status", "needle"),
    [
        ("{bad json", {}, 400, "JSON"),
        ({"model": EMBEDDED_MODEL_NAME}, {}, 400, "messages"),
        ({"model": EMBEDDED_MODEL_NAME, "messages": "hi"}, {}, 400, "messages"),
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, {}, 404, "nope"),
        (
            {
                "model": EMBEDDED_MODEL_NAME,
                "messages": [{"role": "user", "content": "hi"}],
                "top_p": 1.5,
            },
            {},
            400,
            "`top_p` must be in (0, 1], got 1.5",
        ),
        (
            {"model": EMBEDDED_MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]},
            {"Authorization": "Bearer wrong"},
            401,
            "",
        ),
    ],
)
def test_bad_input_through_serve(
    default_app,
    body: Any,
    headers: dict[str, str],
    status: int,  # type: ignore[no-untyped-def]
    needle: str,
) -> None:
    client, _, base = default_app
    hdrs = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **headers}
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{base}/v1/chat/completions", content=data, headers=hdrs, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert needle in err["message"]
    assert _chat(client, PROMPTS[1], stream=False, max_tokens=4)


def test_disconnect_frees_kv(default_app) -> None:  # type: ignore[no-untyped-def]
    _, handle, base = default_app
    baseline = handle.describe.remote().result()["target"]["kv"].get("num_used_blocks", 0)
    body = {
        "model": EMBEDDED_MODEL_NAME,
        "stream": True,
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": "Tell a long story."}],
    }
    hdrs = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream(
        "POST", f"{base}/v1/chat/completions", json=body, headers=hdrs, timeout=60
    ) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data:")
            if seen >= 3:
                break
    assert handle.describe.remote().result()["target"]["kv"].get("num_used_blocks", 0) >= 0
    deadline = time.monotonic() + 30
    while True:
        used = handle.describe.remote().result()["target"]["kv"].get("num_used_blocks", 0)
        if used == baseline:
            break
        assert time.monotonic() < deadline, f"KV still holds {used} blocks"
        time.sleep(0.2)


def _peagle_head(path: Path, hf: Any) -> Path:
    """A random one-layer P-EAGLE head for the embedded model, in speculators' layout."""
    h, nh, nkv = hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads
    hd, inter, n = h // nh, hf.intermediate_size, hf.num_hidden_layers
    aux = [2, n // 2, n - 3]
    g = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).to(torch.bfloat16)

    def ones() -> torch.Tensor:
        return torch.ones(h, dtype=torch.bfloat16)

    t = {
        "fc.weight": w(h, 3 * h),
        "norm.weight": ones(),
        "layers.0.hidden_norm.weight": ones(),
        "layers.0.input_layernorm.weight": ones(),
        "layers.0.post_attention_layernorm.weight": ones(),
        "layers.0.self_attn.q_proj.weight": w(nh * hd, 2 * h),
        "layers.0.self_attn.k_proj.weight": w(nkv * hd, 2 * h),
        "layers.0.self_attn.v_proj.weight": w(nkv * hd, 2 * h),
        "layers.0.self_attn.o_proj.weight": w(h, nh * hd),
        "layers.0.mlp.gate_proj.weight": w(inter, h),
        "layers.0.mlp.up_proj.weight": w(inter, h),
        "layers.0.mlp.down_proj.weight": w(h, inter),
        "mask_hidden": w(1, 1, 3 * h),
    }
    layer_cfg = {
        "model_type": "llama",
        "hidden_size": h,
        "num_attention_heads": nh,
        "num_key_value_heads": nkv,
        "head_dim": hd,
        "intermediate_size": inter,
        "num_hidden_layers": 1,
        "vocab_size": hf.vocab_size,
        "rms_norm_eps": hf.rms_norm_eps,
        "max_position_embeddings": hf.max_position_embeddings,
        "hidden_act": "silu",
        "rope_theta": getattr(hf, "rope_theta", 10000.0),
    }
    config = {
        "architectures": ["PEagleDraftModel"],
        "speculators_model_type": "peagle",
        "speculators_version": "0.9.0",
        "draft_vocab_size": hf.vocab_size,
        "eagle_aux_hidden_state_layer_ids": aux,
        "mask_token_id": 0,
        "norm_before_residual": False,
        "transformer_layer_config": layer_cfg,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "speculators_config": {
            "algorithm": "peagle",
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": 3,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "verifier": {
                "name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "architectures": ["LlamaForCausalLM"],
            },
        },
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_pp2_peagle_drafter_falls_back_visibly(
    cluster: int, in_process: LLM, tmp_path: Path, deploy_router: Any
) -> None:
    head = _peagle_head(tmp_path / "peagle", in_process.runner.hf_config)
    cfg = load_config(
        None,
        {
            "target": {"model": {"dtype": "float32"}, "device": "cpu"},
            "speculative": {
                "model": str(head),
                "pipeline_parallel_size": 2,
                "device": "cpu",
                "dtype": "float32",
            },
        },
    )
    handle = deploy_router("peagle", cfg)
    try:
        caps = handle.describe.remote().result()["drafter"]["capabilities"]
        assert caps["parallel_drafting"] is False
        assert caps["fallback_reason"] == "pipeline_parallel"
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{cluster}/peagle/v1", api_key="x", max_retries=0
        )
        want = in_process.generate(
            [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=12), chat=True
        )[0].text
        got = (
            client.chat.completions.create(
                model=EMBEDDED_MODEL_NAME,
                messages=[{"role": "user", "content": PROMPTS[0]}],
                temperature=0,
                max_tokens=12,
            )
            .choices[0]
            .message.content
        )
        assert got == want
        metrics = httpx.get(f"http://127.0.0.1:{cluster}/peagle/metrics", timeout=30).text
        line = next(
            ln
            for ln in metrics.splitlines()
            if ln.startswith("outrider_spec_decode_parallel_fallback_total{")
        )
        assert 'reason="pipeline_parallel"' in line and float(line.split()[-1]) > 0
    finally:
        serve.delete("peagle")
