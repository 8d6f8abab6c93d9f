"""`edgekit bench` (a short smoke run: well-formed bench.json / bench.md), fused graphs (toolkit/fastgraph.py)
and the runtime's decode loops (same tokens and logits as the plain forward loop). Benchmarks themselves are
commands (BENCHMARKS.md), not timed tests."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_checkpoint
from toolkit import runtime
from toolkit.runtime import session as sessions


@pytest.fixture(scope="module")
def fused_bundle(tiny_bundle, tmp_path_factory):
    """A copy of the tiny bundle with fp32-fused and int4-fused variants (head_dim 8: explicit rotary nodes)."""
    import shutil

    from toolkit.fastgraph import add_fused_variants

    dst = tmp_path_factory.mktemp("fused") / "bundle"
    shutil.copytree(tiny_bundle, dst)
    add_fused_variants(dst, ("fp32", "int4"), log=lambda *_: None)
    return dst


def _greedy_loop(dec, prompt, n):
    logits = [dec.prefill(prompt)]
    tokens = []
    for _ in range(n):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(dec.step(tokens[-1]))
    return tokens, np.stack(logits)


@pytest.mark.parametrize("variant", ["fp32", "fp16", "fp32-fused", "int4-fused"])
def test_io_bound_decode_matches_forward_loop(fused_bundle, variant):
    precision = variant.split("-")[0]
    session = sessions.load(fused_bundle, "cpu", precision, variant=variant)
    prompt = session.tokenizer.encode("One day, Tom went to the park").ids
    n = 20
    ref_tokens, ref_logits = _greedy_loop(sessions.Decoder(session, 64), prompt, n)
    loops = [sessions.SharedKVDecoder] if session.shared_kv else []
    assert type(session.decoder(64)) is (loops or [sessions.Decoder])[-1]
    for cls in loops:
        tokens, logits = _greedy_loop(cls(session, 64), prompt, n)
        assert tokens == ref_tokens, cls.__name__
        assert np.array_equal(logits, ref_logits), cls.__name__  # bit-identical: same graph, same inputs
    # generate() goes through the decoder; the previous path was the forward() loop above
    text = session.generate("One day, Tom went to the park", max_new_tokens=n)
    eos = session.eos_id
    expected = ref_tokens[: ref_tokens.index(eos)] if eos in ref_tokens else ref_tokens
    assert text == session.tokenizer.decode(expected, skip_special_tokens=False)


def test_decoder_capacity_and_context(fused_bundle):
    session = sessions.load(fused_bundle, "cpu", "fp32", variant="fp32-fused")
    dec = session.decoder(6)
    dec.prefill([5, 6, 7, 8, 9])
    dec.step(3)
    with pytest.raises(Exception, match="holds 6 positions"):
        dec.step(4)
    ctx = session.config.context_len  # generation stops at the context window, as before
    prompt = [5] * (ctx - 3)
    assert len(list(session.generate_ids(prompt, max_new_tokens=50))) <= 3


def test_runtime_prefers_fused_variant(fused_bundle):
    assert runtime.load(fused_bundle).variant.name == "fp32-fused"
    assert runtime.load(fused_bundle, precision="int4").variant.name == "int4-fused"
    assert sessions.load(fused_bundle, variant="fp32").variant.name == "fp32"
    with pytest.raises(Exception, match="no variant named"):
        sessions.load(fused_bundle, variant="nope")


def test_fused_forward_follows_the_contract(fused_bundle):
    """Padding, batches and batched chunks with a past: same logits / present as the exported graph."""
    ref = sessions.load(fused_bundle, "cpu", "fp32", variant="fp32")
    fused = sessions.load(fused_bundle, "cpu", "fp32", variant="fp32-fused")
    ids = np.array([[5, 6, 7, 8], [0, 0, 7, 8]])
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    a, pa = ref.forward(ids, attention_mask=mask)
    b, pb = fused.forward(ids, attention_mask=mask)
    assert np.abs(a[0] - b[0]).max() <= 1e-4 and np.abs(a[1, 2:] - b[1, 2:]).max() <= 1e-4  # padded query rows aside
    assert np.abs(pa[1][0][:, :, 2:] - pb[1][0][:, :, 2:]).max() <= 1e-4
    chunk = np.array([[9, 10, 11], [12, 13, 14]])  # batch > 1, T > 1 with a past: row by row
    mask2 = np.c_[mask, np.ones((2, 3), np.int64)]
    a2, qa = ref.forward(chunk, past=pa, attention_mask=mask2)
    b2, qb = fused.forward(chunk, past=pb, attention_mask=mask2)
    assert np.abs(a2 - b2).max() <= 1e-4 and qb[0][0].shape == qa[0][0].shape


@pytest.mark.parametrize("overrides", [
    dict(norm_type="rmsnorm", ffn_type="swiglu", d_model=64, n_kv_heads=2),  # head_dim 16: rotary inside GQA
    dict(pos_encoding="learned", ffn_type="gelu_tanh", attn_bias=True, proj_bias=True, tie_embeddings=False),
    dict(pos_encoding="sinusoidal", ffn_type="relu"),
])
def test_fused_graph_matches_pytorch(tmp_path, overrides):
    from toolkit.fastgraph import check_fused, write_fused
    from toolkit.sources import load_reference

    model, _ = load_reference(make_checkpoint(tmp_path / "ckpt", steps=3, **overrides))
    path = write_fused(model, tmp_path / "fused.onnx")
    assert check_fused(model, path, seq=12) <= 1e-4


def test_fused_graph_refuses_unsupported(tmp_path):
    from toolkit.errors import ExportError
    from toolkit.fastgraph import write_fused
    from toolkit.sources import load_reference

    model, _ = load_reference(make_checkpoint(tmp_path / "ckpt", steps=0, norm_placement="post"))
    with pytest.raises(ExportError, match="post-norm"):
        write_fused(model, tmp_path / "fused.onnx")


def test_bench_smoke_report(fused_bundle, tmp_path):
    from toolkit.bench import ROW_KEYS, run

    report = run(fused_bundle, targets=["cpu", "openvino-npu"], precisions=["fp32", "int8"], prompt_len=8,
                 new_tokens=4, threads=1, repeats=1, report_dir=tmp_path / "report", log=lambda *_: None)
    data = json.loads((tmp_path / "report" / "bench.json").read_text())
    assert {"machine", "baseline", "results", "settings"} <= set(data)
    assert {"cpu", "cores", "threads", "libraries"} <= set(data["machine"]) and data["machine"]["threads"] == 1
    assert data["baseline"]["target"] == "pytorch-eager" and data["baseline"]["decode_tok_s"] > 0
    rows = {(r["target"], r["precision"], r["variant"]): r for r in data["results"]}
    for r in data["results"]:
        assert set(ROW_KEYS) <= set(r)
    for key in (("cpu", "fp32", "fp32"), ("cpu", "fp32", "fp32-fused")):
        r = rows[key]
        assert r["status"] == "ok", r["reason"]
        assert r["decode_tok_s"] > 0 and r["ttft_ms"] > 0 and r["peak_rss_mb"] > 0 and r["bundle_mb"] > 0
        assert r["ratio_vs_eager"] == pytest.approx(r["decode_tok_s"] / data["baseline"]["decode_tok_s"])
        assert r["greedy_match"] == "5/5"  # prompt + 4 steps, the same greedy tokens as PyTorch
    assert rows[("cpu", "int8", None)]["status"] == "unavailable"  # no int8 variant: reported, not skipped
    assert all(r["status"] == "unavailable" and r["reason"] for r in data["results"] if r["target"] == "openvino-npu")
    md = (tmp_path / "report" / "bench.md").read_text()
    assert "| target |" in md and "pytorch-eager" in md and "unavailable" in md
    assert report["results"] and "files" in report


def test_cli_bench_errors(fused_bundle, capsys):
    from toolkit.cli import main

    assert main(["bench", str(fused_bundle), "--targets", "nowhere"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown target" in err[0]
    assert main(["bench", str(fused_bundle), "--prompt-len", "60", "--new-tokens", "60"]) != 0
    assert "context window" in capsys.readouterr().err
