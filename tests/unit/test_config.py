from __future__ import annotations

from pathlib import Path

import pytest

from outrider.cluster.config import ConfigError, OutriderConfig, load_config
from outrider.workers.config import SamplingParams


def test_defaults_validate() -> None:
    cfg = load_config()
    assert cfg == OutriderConfig()
    assert cfg.target.model.path is None
    assert cfg.speculative is None


def test_yaml_and_json_and_overrides(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text(
        "target:\n  model: {dtype: float64, max_model_len: 512}\n"
        "  kernels: {moe_backend: torch}\n"
        "speculative: {method: ngram, num_speculative_tokens: 3}\n"
    )
    cfg = load_config(y, {"target": {"model": {"dtype": "float32"}}})
    assert cfg.target.model.dtype == "float32"
    assert cfg.target.model.max_model_len == 512
    assert cfg.target.kernels.moe_backend == "torch"
    assert cfg.speculative is not None and cfg.speculative.num_speculative_tokens == 3
    j = tmp_path / "c.json"
    j.write_text('{"scheduler": {"max_num_seqs": 4}}')
    assert load_config(j).scheduler.max_num_seqs == 4


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "target: {model: {dtyp: float32}}",
            r"unknown key `target.model.dtyp`; allowed keys: .*dtype",
        ),
        ("bogus: 1", r"unknown key `bogus`; allowed keys: scheduler, server, speculative, target"),
        ("target: {model: {dtype: float8}}", r"`target.model.dtype`"),
        ("scheduler: {max_num_seqs: many}", r"`scheduler.max_num_seqs`: Expected `int`"),
        ("scheduler: {max_num_seqs: 0}", r"`scheduler.max_num_seqs` must be >= 1, got 0"),
        ("speculative: {num_speculative_tokens: 3}", r"set `method` or"),
        ("speculative: {method: ngram, num_speculative_tokens: 40}", r"must be in \[1, 32\]"),
        (
            "speculative: {method: ngram, num_speculative_tokens: 2, prompt_lookup_min: 4, "
            "prompt_lookup_max: 2}",
            r"prompt_lookup_min` must be <= prompt_lookup_max",
        ),
        ("- 1\n- 2", r"mapping at the top level"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(p)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/outrider.yaml")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_p": 1.5}, r"`top_p` must be in \(0, 1\], got 1.5"),
        ({"top_p": 0.0}, r"`top_p` must be in \(0, 1\], got 0.0"),
        ({"temperature": -0.1}, r"`temperature` must be >= 0, got -0.1"),
        ({"max_tokens": 0}, r"`max_tokens` must be > 0, got 0"),
    ],
)
def test_sampling_params_validation(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SamplingParams(**kwargs).validate()  # type: ignore[arg-type]
