"""Reports: parity.json with stable keys, then parity.md and parity.html rendered from it (no model needed)."""

from __future__ import annotations

import builtins
import json
import math

from toolkit.report import clean, render_markdown, write_reports


def _metrics(max_abs: float, kl: float, flips: int = 0) -> dict:
    return {"max_abs": max_abs, "mean_abs": max_abs / 10, "cosine": 1.0 - kl, "top1_agreement": 1.0 - flips / 100,
            "top5_overlap": 1.0, "kl_mean": kl, "kl_p99": kl * 5, "ppl": 5.0 * (1 + kl), "ppl_reference": 5.0,
            "ppl_delta_pct": 100 * kl, "greedy_match_steps": 33 - flips, "greedy_match_steps_per_prompt": [33, 33 - flips, 33],
            "greedy_tokens": 33, "greedy_agreement": (33 - flips) / 33, "nonfinite": 0, "positions": 200,
            "near_ties": {"margin": 1e-3, "count": 2, "top1_disagreements": flips, "top1_disagreements_on_near_ties": min(flips, 1)}}


def _series(scale: float) -> dict:
    edges = [0.0] + [10.0 ** e for e in range(-9, 4)]
    return {"abs_error_hist": {"edges": edges, "counts": [0, 0, 5, 40, 100 * scale, 3, 0, 0, 0, 0, 0, 0, 0]},
            "kl_per_position": [1e-7 * scale * (1 + i % 3) for i in range(16)], "kl_per_decode_step": [0.0, 1e-7, float("nan")]}


def sample_report() -> dict:
    return {
        "format": "edgekit-parity/1", "generated": "2025-01-01T00:00:00+0000", "verdict": "fail",
        "counts": {"pass": 1, "fail": 1, "unavailable": 1},
        "bundle": {"path": "bundles/tiny", "variants": ["fp32", "int8"]},
        "reference": {"checkpoint": "runs/tiny/step-000600", "sha256": "ab" * 32, "manifest_sha256": "ab" * 32,
                      "sha256_matches_manifest": True, "params": 1_000_000, "precision": "fp32", "runtime": "PyTorch",
                      "eval_text": {"source": "built-in", "tokens": 5000, "windows": 8, "window_len": 256, "ppl": 5.0},
                      "decode": {"prompts": ["a", "b", "c"], "prompt_len": 16, "decode_steps": 32, "greedy_tokens": 33}},
        "environment": {"python": "3.11", "platform": "Linux", "cpu": "test CPU", "cpu_count": 2,
                        "libraries": {"onnxruntime": "1.0"}, "providers": ["CPUExecutionProvider"]},
        "results": [
            {"target": "cpu", "precision": "fp32", "status": "pass", "reason": "", "variant": "fp32",
             "actual_precision": "fp32", "size_bytes": 4_000_000, "metrics": _metrics(2e-7, 1e-15),
             "failures": [], "first_divergence": None, "series": _series(1.0)},
            {"target": "cpu", "precision": "int8", "status": "fail", "reason": "kl_mean = 0.01 > kl_mean_max 0.002",
             "variant": "int8", "actual_precision": "int8", "size_bytes": 1_000_000, "metrics": _metrics(0.3, 0.01, flips=3),
             "failures": ["kl_mean = 0.01 > kl_mean_max 0.002"], "series": _series(3.0),
             "first_divergence": {"status": "found", "layer": 1, "hidden_state": 2, "where": "output of block 1 (layers.1, hidden state 2)",
                                  "rel_err": 0.2, "max_abs": 0.1, "tolerance": 0.05, "method": "graph-surgery",
                                  "per_layer": [{"hidden_state": j, "rel_err": e, "max_abs": e} for j, e in enumerate([0.0, 0.01, 0.2])]}},
            {"target": "gpu", "precision": "fp32", "status": "unavailable", "reason": "no CUDAExecutionProvider",
             "metrics": None, "first_divergence": None},
        ],
    }


def test_clean_makes_strict_json():
    data = clean({"a": float("nan"), "b": [float("inf"), 1.5], "c": (1, 2)})
    assert data == {"a": None, "b": [None, 1.5], "c": [1, 2]}
    json.dumps(data, allow_nan=False)


def test_write_reports(tmp_path):
    paths = write_reports(sample_report(), tmp_path / "rep")
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["parity.html", "parity.json", "parity.md"]
    data = json.loads(paths["json"].read_text())
    assert {"reference", "environment", "results"} <= set(data)
    for r in data["results"]:
        assert {"target", "precision", "status", "reason", "metrics", "first_divergence"} <= set(r)
    assert data["results"][0]["series"]["kl_per_decode_step"][2] is None  # NaN -> null
    md = paths["md"].read_text()
    assert md.count("| cpu |") == 2 and "| gpu |" in md and "**FAIL**" in md
    assert "output of block 1 (layers.1, hidden state 2)" in md and "no CUDAExecutionProvider" in md
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == 3 and "<table>" in html
    for title in ("Logit error histogram", "KL per position", "Quality vs size"):
        assert title in html


def test_markdown_is_rendered_from_json_alone():
    report = json.loads(json.dumps(clean(sample_report())))
    text = render_markdown(report)
    assert "33/33 [33, 33, 33]" in text and "30/33 [33, 30, 33]" in text
    assert not math.isnan(report["results"][1]["metrics"]["kl_mean"])


def test_html_without_matplotlib(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    html = write_reports(sample_report(), tmp_path)["html"].read_text()
    assert "Plots need matplotlib" in html and "data:image/png" not in html
