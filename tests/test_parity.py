"""Parity harness: metrics on hand-made arrays, thresholds, and the harness on real tiny bundles
(honest export passes; a perturbed layer fails and is named; NaN fails; unavailable is reported)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from toolkit.cli import main
from toolkit.errors import ConfigError, ParityFailure
from toolkit.parity_metrics import LogitStats, check, greedy_match, parse_thresholds
from toolkit.report import clean

FAST = ["--windows", "2", "--decode-steps", "32"]


# --- metrics on hand-made arrays -------------------------------------------------------------------
def test_identical_logits_are_perfect():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2, 5, 50)).astype(np.float32)
    s = LogitStats()
    s.update(ref, ref.copy(), targets=rng.integers(0, 50, size=(2, 5)))
    m = s.summary()
    assert m["max_abs"] == 0 and m["mean_abs"] == 0 and m["nonfinite"] == 0
    assert m["cosine"] == pytest.approx(1.0) and m["top1_agreement"] == 1.0 and m["top5_overlap"] == 1.0
    assert m["kl_mean"] == 0 and m["kl_p99"] == 0
    assert m["ppl"] == pytest.approx(m["ppl_reference"]) and m["ppl_delta_pct"] == pytest.approx(0.0)
    assert m["positions"] == 10 and m["near_ties"]["top1_disagreements"] == 0


def test_known_kl_and_errors():
    ref = np.array([[0.0, 0.0]])  # p = (1/2, 1/2)
    cand = np.array([[math.log(3.0), 0.0]])  # q = (3/4, 1/4)
    s = LogitStats()
    kl = s.update(ref, cand, targets=np.array([1]))
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # = 0.5 ln(4/3)
    assert kl[0] == pytest.approx(expected)
    m = s.summary()
    assert m["kl_mean"] == pytest.approx(expected) and m["max_abs"] == pytest.approx(math.log(3.0))
    assert m["mean_abs"] == pytest.approx(math.log(3.0) / 2)
    assert m["ppl_delta_pct"] == pytest.approx(100 * (4.0 - 2.0) / 2.0)  # target 1: p = 1/2 vs q = 1/4


def test_nonfinite_always_fails_and_near_ties_explain_flips():
    ref = np.array([[1.0, 1.0005, 0.0], [5.0, 0.0, 0.0]])  # row 0: a near tie (margin 5e-4)
    cand = np.array([[1.001, 1.0, 0.0], [np.nan, 0.0, 0.0]])
    s = LogitStats(near_tie_margin=1e-3)
    s.update(ref, cand)
    m = s.summary()
    assert m["nonfinite"] == 1
    assert m["near_ties"] == {"margin": 1e-3, "count": 1, "top1_disagreements": 2, "top1_disagreements_on_near_ties": 1}
    failures = check(m, [])
    assert failures and "non-finite" in failures[0]


def test_greedy_match_counts_leading_agreement():
    logits = np.eye(4)[[0, 1, 3, 2]]  # argmax 0, 1, 3, 2
    assert greedy_match([0, 1, 2, 2], logits) == 2
    assert greedy_match([0, 1, 3, 2], logits) == 4
    assert greedy_match([1, 1, 3, 2], logits) == 0


def test_threshold_naming():
    checks, settings = parse_thresholds({"max_abs_max": 1e-4, "top1_agreement_min": 0.99, "near_tie_margin": 0.01}, "t")
    assert checks == [("max_abs", "max", 1e-4), ("top1_agreement", "min", 0.99)] and settings["near_tie_margin"] == 0.01
    assert check({"max_abs": 2e-4, "top1_agreement": 0.995, "nonfinite": 0}, checks) == [
        "max_abs = 0.0002 > max_abs_max 0.0001"]
    with pytest.raises(ConfigError) as e:
        parse_thresholds({"max_abs": 1e-4, "speed_max": 3, "kl_mean_max": "low"}, "targets/x.toml")
    text = str(e.value)
    assert "max_abs_max or max_abs_min" in text and "unknown threshold 'speed_max'" in text and "must be a number" in text


# --- the harness on tiny bundles -------------------------------------------------------------------
def _report(folder: Path) -> dict:
    return json.loads((folder / "parity.json").read_text(encoding="utf-8"))


def _bundle_from_model(model, ckpt: Path, out: Path) -> Path:
    """An fp32 bundle exported from `model` whose manifest names `ckpt` as its source (so the reference
    is the unmodified checkpoint). export_bundle itself refuses such models, hence the manual build."""
    from toolkit.bundle import build_manifest, new_bundle, sha256_file, write_manifest
    from toolkit.export import export_onnx

    with new_bundle(out) as tmp:
        shutil.copyfile(ckpt / "tokenizer.json", tmp / "tokenizer.json")
        export_onnx(model, tmp / "fp32" / "model.onnx")
        source = {"checkpoint": str(ckpt.resolve()), "sha256": sha256_file(ckpt / "model.safetensors")}
        variants = [{"name": "fp32", "precision": "fp32", "targets": ["cpu"], "files": ["fp32/model.onnx"],
                     "model": "fp32/model.onnx"}]
        write_manifest(tmp, build_manifest(tmp, model.cfg.__dict__.copy(), source, variants))
    return out


def test_honest_export_passes_and_reports(bundle_copy, tmp_path, capsys):
    from toolkit.bundle import Bundle

    rc = main(["parity", str(bundle_copy), "--report", str(tmp_path / "rep"), *FAST])
    out = capsys.readouterr().out
    assert rc == 0, out
    rep = _report(tmp_path / "rep")
    assert {"reference", "environment", "results"} <= set(rep)
    assert rep["reference"]["sha256_matches_manifest"] is True
    assert {"libraries", "cpu", "providers"} <= set(rep["environment"])
    by_prec = {r["precision"]: r for r in rep["results"]}
    assert set(by_prec) == {"fp32", "fp16"}
    for r in rep["results"]:
        assert r["status"] == "pass" and r["target"] == "cpu" and r["actual_precision"] in ("fp32", r["precision"])
        assert {"max_abs", "mean_abs", "cosine", "top1_agreement", "top5_overlap", "kl_mean", "kl_p99", "ppl",
                "ppl_delta_pct", "greedy_match_steps", "nonfinite", "near_ties"} <= set(r["metrics"])
    m = by_prec["fp32"]["metrics"]
    assert m["max_abs"] < 1e-4 and m["greedy_match_steps"] == 33 and m["greedy_agreement"] == 1.0
    assert len(m["greedy_match_steps_per_prompt"]) == 3
    assert (tmp_path / "rep" / "parity.md").read_text().count("| cpu |") == 2
    html = (tmp_path / "rep" / "parity.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["parity.html", "parity.json", "parity.md"]
    parity = {v.name: v.parity for v in Bundle.open(bundle_copy).variants}
    assert parity["fp32"]["cpu"]["status"] == "pass" and parity["fp16"]["cpu"]["status"] == "pass"


def test_perturbed_layer_fails_and_is_located(tiny_checkpoint, tmp_path, capsys):
    import torch

    from toolkit import checkpoint

    model, _, ckpt = checkpoint.load(tiny_checkpoint)
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight.mul_(1.5)
    bundle = _bundle_from_model(model, ckpt, tmp_path / "bad")
    rc = main(["parity", str(bundle), "--report", str(tmp_path / "rep"), *FAST])
    captured = capsys.readouterr()
    assert rc == 1
    assert "max_abs" in captured.err and "cpu/fp32: fail" in captured.err
    (r,) = _report(tmp_path / "rep")["results"]
    assert r["status"] == "fail" and r["metrics"]["max_abs"] > 1e-4
    fd = r["first_divergence"]
    assert fd["status"] == "found" and fd["layer"] == 1 and fd["hidden_state"] == 2, fd
    assert fd["per_layer"][1]["rel_err"] < 1e-5 < fd["per_layer"][2]["rel_err"]
    assert "layers.1" in captured.out


def test_nan_model_fails(tiny_bundle, tmp_path):
    """One NaN weight written into the ONNX graph itself (no re-export)."""
    import onnx
    from onnx import numpy_helper

    from toolkit import parity
    from toolkit.bundle import Bundle, build_manifest, new_bundle, write_manifest

    src = Bundle.open(tiny_bundle)
    model = onnx.load(str(src.path_of("fp32/model.onnx")))
    init = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).size if t.data_type == 1 else 0)
    weights = numpy_helper.to_array(init).copy()
    weights.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(weights, init.name))
    with new_bundle(tmp_path / "nan") as tmp:
        shutil.copyfile(src.tokenizer_path, tmp / "tokenizer.json")
        (tmp / "fp32").mkdir()
        onnx.save(model, str(tmp / "fp32" / "model.onnx"))
        fp32 = {k: v for k, v in src.manifest["variants"][0].items() if k in ("name", "precision", "targets", "model")}
        write_manifest(tmp, build_manifest(tmp, src.manifest["model"], src.manifest["source"],
                                           [{**fp32, "files": ["fp32/model.onnx"]}]))
    report = parity.run(tmp_path / "nan", windows=1, decode_steps=32, record=False, log=lambda *_: None)
    (r,) = report["results"]
    assert r["status"] == "fail" and r["metrics"]["nonfinite"] > 0
    assert r["first_divergence"]["status"] == "found"
    with pytest.raises(ParityFailure, match="non-finite"):
        parity.enforce(report)
    json.dumps(clean(report), allow_nan=False)  # the report stays valid JSON (NaN -> null)


def test_unavailable_is_reported_not_skipped(bundle_copy, tmp_path, monkeypatch, capsys):
    from toolkit import targets

    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    for v in manifest["variants"]:
        if v["name"] == "fp32":
            v["targets"].append("gpu")  # a real profile whose provider (CUDA) this machine lacks
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    rc = main(["parity", str(bundle_copy), "--targets", "cpu,gpu", "--precisions", "fp32,int8",
               "--report", str(tmp_path / "rep"), "--no-record", *FAST])
    assert rc == 0, capsys.readouterr()
    res = {(r["target"], r["precision"]): r for r in _report(tmp_path / "rep")["results"]}
    assert res["cpu", "fp32"]["status"] == "pass"
    assert res["cpu", "int8"]["status"] == "unavailable" and "no int8 variant" in res["cpu", "int8"]["reason"]
    if "gpu" in targets.all_targets():
        gpu = res["gpu", "fp32"]
        assert gpu["status"] == "unavailable" and gpu["reason"], gpu
    rc = main(["parity", str(bundle_copy), "--precisions", "int8", "--strict", "--no-record", *FAST])
    assert rc == 1


def test_user_errors_exit_2(bundle_copy, tmp_path, capsys):
    assert main(["parity", str(bundle_copy), "--targets", "nope"]) == 2
    assert main(["parity", str(bundle_copy), "--precisions", "int3"]) == 2
    short = tmp_path / "short.txt"
    short.write_text("Tom ran.")
    assert main(["parity", str(bundle_copy), "--eval-text", str(short), "--no-record"]) == 2
    assert "one window needs" in capsys.readouterr().err
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["source"]["checkpoint"] = str(tmp_path / "gone")
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["parity", str(bundle_copy), "--no-record"]) == 2
    assert "--reference" in capsys.readouterr().err


def test_changed_reference_is_refused(bundle_copy, tiny_checkpoint, tmp_path, capsys):
    changed = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, changed)
    data = bytearray((changed / "model.safetensors").read_bytes())
    data[-1] ^= 1  # flip one bit of the last weight
    (changed / "model.safetensors").write_bytes(bytes(data))
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["source"]["checkpoint"] = str(changed)
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["parity", str(bundle_copy), "--no-record"]) == 2
    assert "has changed since the bundle was exported" in capsys.readouterr().err
    # an explicit --reference is used as given, and the report says it differs from the manifest
    assert main(["parity", str(bundle_copy), "--reference", str(tiny_checkpoint), "--no-record",
                 "--report", str(tmp_path / "rep"), *FAST]) == 0
    assert _report(tmp_path / "rep")["reference"]["sha256_matches_manifest"] is True
