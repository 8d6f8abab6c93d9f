"""`edgekit pipeline` end to end on a tiny recipe: train -> export -> (quantize hook) -> parity -> summary;
a rerun reuses the checkpoint and bundle; the exit code is the parity verdict."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest

from toolkit.cli import main

RECIPE = """
name = "pipe-tiny"
[model]
context_len = 64
d_model = 32
n_layers = 2
n_heads = 4
pos_encoding = "rope"
norm_type = "rmsnorm"
ffn_type = "swiglu"
[tokenizer]
vocab_size = 320
[training]
steps = 4
batch_size = 4
seq_len = 32
warmup_steps = 1
eval_every = 2
eval_batches = 1
save_every = 4
threads = 1
"""


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from toolkit.corpus import default_corpus

    root = tmp_path_factory.mktemp("pipeline")
    (root / "tiny.toml").write_text(RECIPE)
    (root / "corpus.txt").write_text("\n".join(default_corpus(150, seed=3)))
    return root


def _args(root, *extra):
    return ["pipeline", str(root / "tiny.toml"), "--corpus", str(root / "corpus.txt"), "--out", str(root / "out"),
            "--no-progress", *extra]


def test_pipeline_end_to_end_then_reuse(pipeline_dir, capsys):
    root = pipeline_dir
    assert main(_args(root, "--steps", "4")) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    if importlib.util.find_spec("toolkit.quantize") is None:
        assert "quantization: not available yet" in out
    else:
        assert "quantize    added" in out
    for needle in ("parameters", "val ppl", "bundle", "cpu/fp32: PASS", "cpu/fp16: PASS", "verdict     PASS"):
        assert needle in out, needle
    html = root / "out" / "report" / "parity.html"
    assert html.is_file() and str(html) in out.splitlines()[-1]
    rep = json.loads((root / "out" / "report" / "parity.json").read_text())
    assert {r["status"] for r in rep["results"]} == {"pass"} and len(rep["results"]) >= 2
    # a second run reuses the checkpoint and the bundle
    assert main(_args(root, "--steps", "4")) == 0
    out = capsys.readouterr().out
    assert "reused" in out and "exported from this checkpoint" in out


def test_pipeline_exit_code_is_the_verdict(pipeline_dir, monkeypatch, capsys):
    from toolkit import targets

    if not (pipeline_dir / "out" / "bundle").exists():
        pytest.skip("needs the end-to-end run")
    real = targets.all_targets

    def strict_cpu(*a, **k):  # an impossible threshold: more greedy tokens than are generated
        profiles = real(*a, **k)
        cpu = profiles["cpu"]
        table = {p: {**t, "greedy_match_steps_min": 1000} for p, t in cpu.thresholds.items()}
        return {**profiles, "cpu": dataclasses.replace(cpu, thresholds=table)}

    monkeypatch.setattr(targets, "all_targets", strict_cpu)
    assert main(_args(pipeline_dir, "--steps", "4")) == 1
    captured = capsys.readouterr()
    assert "verdict     FAIL" in captured.out and "greedy_match_steps" in captured.err


def test_pipeline_refuses_a_different_recipe_and_unknown_target(pipeline_dir, capsys):
    if not (pipeline_dir / "out" / "checkpoint").exists():
        pytest.skip("needs the end-to-end run")
    other = pipeline_dir / "other.toml"
    other.write_text(RECIPE.replace("d_model = 32", "d_model = 64"))
    assert main(["pipeline", str(other), "--corpus", str(pipeline_dir / "corpus.txt"), "--out",
                 str(pipeline_dir / "out"), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(_args(pipeline_dir, "--targets", "nope")) == 2


def test_quantize_step_reports_the_static_pair_size(pipeline_dir, tmp_path):
    """The pipeline's quantize line gives the qnn-htp pair's size (read from the manifest), not "n/a"."""
    import re
    import shutil

    from toolkit.pipeline import quantize_step

    if not (pipeline_dir / "out" / "bundle").exists():
        pytest.skip("needs the end-to-end run")
    bundle = tmp_path / "bundle"
    shutil.copytree(pipeline_dir / "out" / "bundle", bundle)
    note, failed = quantize_step(bundle, ["qnn-htp"], log=lambda *_: None)
    assert not failed and re.fullmatch(r"added qnn-htp \d+(\.\d+)? [KM]?B", note), note
