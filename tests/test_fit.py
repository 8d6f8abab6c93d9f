"""The memory-fit planner: the reference table, exact parameter counts, the KV-cache formula, budgets, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit import fit, targets
from toolkit.config import ModelConfig
from toolkit.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("precision, gb", [("fp32", 28.0), ("fp16", 14.0), ("bf16", 14.0), ("int8", 7.0), ("int4", 3.5)])
def test_reference_table_7b(precision, gb):
    """7B parameters: 28 GB fp32, 14 GB fp16, 7 GB int8, 3.5 GB 4-bit (weights)."""
    shape = fit.generic_shape(7e9)
    e = fit.estimate(shape, precision, context=2048)
    assert e.weights / 1e9 == pytest.approx(gb, rel=1e-9)
    if precision == "int4":  # group scales come on top, as a separate line: fp16 scale + 4-bit zero per 32
        assert e.scales == pytest.approx(7e9 / 32 * 2.5)
    assert e.total > e.weights


def test_generic_shape_is_llama_like():
    s = fit.generic_shape(7e9)
    assert (s.d_model, s.n_layers, s.head_dim, s.vocab_size) == (4096, 32, 128, 32000)
    assert 12 * s.n_layers * s.d_model ** 2 + 2 * s.vocab_size * s.d_model == pytest.approx(7e9, rel=0.05)
    with pytest.raises(ConfigError):
        fit.generic_shape(0)


@pytest.mark.parametrize("overrides", [
    {},
    dict(n_kv_heads=2, tie_embeddings=False, norm_type="rmsnorm", ffn_type="swiglu"),
    dict(pos_encoding="learned", attn_bias=True, proj_bias=True, norm_placement="post"),
    dict(n_experts=3, top_k=1, ffn_type="swiglu", proj_bias=True),
])
def test_parameter_count_matches_the_model(overrides):
    from toolkit.model import Transformer

    cfg = ModelConfig(vocab_size=300, context_len=32, d_model=32, n_layers=2, n_heads=4, **overrides)
    shape = fit.shape_from_config(cfg)
    assert shape.params == Transformer(cfg).num_params()


def test_kv_cache_formula():
    cfg = ModelConfig(vocab_size=1000, context_len=512, d_model=256, n_layers=6, n_heads=8, n_kv_heads=2)
    shape = fit.shape_from_config(cfg)
    for precision, nbytes in (("fp32", 4), ("fp16", 2), ("a16w8", 2)):
        e = fit.estimate(shape, precision, context=300, batch=3)
        assert e.kv_cache == 2 * 6 * 2 * 32 * 300 * 3 * nbytes
    assert fit.estimate(shape, "fp32", 300, batch=2).activations > fit.estimate(shape, "fp32", 300).activations


def test_budgets_decide_what_fits():
    gpu = targets.get("gpu")  # 8192 MiB
    big = fit.plan(fit.generic_shape(7e9, context=1024), gpu, precisions=["all"])
    rows = {r["precision"]: r for r in big["rows"]}
    assert rows["fp32"]["fits"] is False and rows["fp16"]["fits"] is False
    assert rows["int4"]["fits"] is True and "int4" in big["fits"]
    assert rows["int8"]["supported_by_target"] is False and "int8" not in big["fits"]
    small = fit.plan(fit.generic_shape(1e9, context=1024), gpu)
    assert [r["precision"] for r in small["rows"]] == list(gpu.precisions)
    assert "fp16" in small["fits"]
    qnn = fit.plan(fit.shape_from_source("tiny"), targets.get("qnn-htp"))
    assert qnn["fits"] == ["a16w8"] and qnn["rows"][0]["detail"]["tokens_per_pass"] == targets.get("qnn-htp").window


def test_cpu_computes_fp16_in_fp32():
    shape = fit.shape_from_source("small")
    cpu = fit.plan(shape, targets.get("cpu"), precisions=["fp16"])["rows"][0]
    gpu = fit.plan(shape, targets.get("gpu"), precisions=["fp16"])["rows"][0]
    assert cpu["detail"]["compute"] == "fp32" and gpu["detail"]["compute"] == "fp16"
    assert cpu["total"] > gpu["total"]


def test_sources(tiny_checkpoint, tiny_bundle):
    from toolkit import checkpoint

    cfg = checkpoint.read_config(checkpoint.resolve(tiny_checkpoint))[0]
    for source in (tiny_checkpoint, tiny_bundle):
        shape = fit.shape_from_source(str(source))
        assert shape.exact and shape.params == fit.shape_from_config(cfg).params
    assert fit.shape_from_source("tiny").name == "recipe tiny"
    with pytest.raises(ConfigError):
        fit.plan(fit.shape_from_source(str(tiny_bundle)), targets.get("cpu"), context=10_000)


def test_fit_cli(capsys, tiny_bundle):
    from toolkit.cli import main

    assert main(["fit", "--params", "7e9", "--target", "gpu", "--precisions", "all", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    weights = {r["precision"]: r["weights"] / 1e9 for r in out["rows"]}
    assert weights["fp32"] == pytest.approx(28) and weights["int4"] == pytest.approx(3.5)
    assert main(["fit", str(tiny_bundle), "--target", "qnn-htp", "--context", "32"]) == 0
    text = capsys.readouterr().out
    assert "a16w8" in text and "fits on qnn-htp: a16w8" in text
    assert main(["fit", "--target", "cpu"]) == 2  # neither a source nor --params
    assert "either a SOURCE" in capsys.readouterr().err


@pytest.mark.slow
def test_estimate_within_25_percent_of_measured_peak(tmp_path):
    """scripts/fit_measure.py on the tiny and small shapes (random weights): builds bundles, measures the
    peak RSS of generating with toolkit.runtime, compares with the plan."""
    out = tmp_path / "m.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "fit_measure.py"), "--out", str(tmp_path),
                          "--sizes", "tiny,small", "--json", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    for row in json.loads(out.read_text()):
        assert abs(row["relative_error"]) <= 0.25, row
