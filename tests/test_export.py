"""ONNX export: every model option exports and matches PyTorch in ONNX Runtime; KV-cache decode; fp16."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import make_checkpoint
from toolkit import checkpoint, runtime
from toolkit.export import export_onnx, input_names, output_names

TOL = 1e-4

# a small set that covers every option at least once (the default rope / pre / layernorm / gelu model is
# the tiny_bundle fixture)
OPTIONS = {
    "learned-post-rmsnorm-relu": dict(pos_encoding="learned", norm_placement="post", norm_type="rmsnorm", ffn_type="relu"),
    "sinusoidal-swiglu-gqa-bias": dict(pos_encoding="sinusoidal", ffn_type="swiglu", n_kv_heads=2, attn_bias=True,
                                       proj_bias=True),
    "rope-moe-mqa-untied": dict(n_experts=4, top_k=2, n_kv_heads=1, tie_embeddings=False, norm_type="rmsnorm",
                                ffn_type="gelu_tanh"),
}


def _max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - b.detach().numpy()).max())


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_exports_and_matches_pytorch(name, tmp_path):
    model, _, _ = checkpoint.load(make_checkpoint(tmp_path / "ckpt", steps=20, **OPTIONS[name]))
    cfg = model.cfg
    external = name == "rope-moe-mqa-untied"  # one case stores its weights as ONNX external data
    path = export_onnx(model, tmp_path / "model.onnx", debug_hidden=True, external_data=external)  # + onnx.checker
    assert path.with_name("model.onnx.data").is_file() == external
    graph = onnx.load(str(path), load_external_data=False).graph
    assert [i.name for i in graph.input] == input_names(cfg.n_layers)
    assert [o.name for o in graph.output] == output_names(cfg.n_layers, debug_hidden=True)

    session = runtime.load_model_file(path, cfg)
    g = torch.Generator().manual_seed(0)
    B, T, T2 = 2, 7, 3
    ids = torch.randint(0, cfg.vocab_size, (B, T + T2), generator=g)
    mask = torch.ones(B, T + T2, dtype=torch.long)
    mask[1, :2] = 0  # left padding in the second row
    with torch.no_grad():
        # prefill with an empty cache (P = 0), then a 3-token cached step
        pos = torch.arange(T).expand(B, T)
        ref = model(ids[:, :T], pos, mask[:, :T], output_hidden_states=True)
        out = session.run(session.feeds(ids[:, :T].numpy(), attention_mask=mask[:, :T].numpy()))
        assert _max_abs(out["logits"], ref.logits) <= TOL
        for i, (k, v) in enumerate(ref.present):
            assert _max_abs(out[f"present.{i}.key"], k) <= TOL and _max_abs(out[f"present.{i}.value"], v) <= TOL
        for j, h in enumerate(ref.hidden_states):
            assert _max_abs(out[f"hidden_states.{j}"], h) <= TOL

        pos2 = torch.arange(T, T + T2).expand(B, T2)
        ref2 = model(ids[:, T:], pos2, mask, past_key_values=ref.present)
        past = [(out[f"present.{i}.key"], out[f"present.{i}.value"]) for i in range(cfg.n_layers)]
        logits2, present2 = session.forward(ids[:, T:].numpy(), past=past, attention_mask=mask.numpy())
        assert _max_abs(logits2, ref2.logits) <= TOL
        assert present2[0][0].shape == (B, cfg.kv_heads, T + T2, cfg.head_dim)
        assert _max_abs(present2[-1][1], ref2.present[-1][1]) <= TOL


def test_bundle_manifest_and_contract(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["format"] == "edgekit-bundle/1"
    assert manifest["tokenizer"] == "tokenizer.json" and "tokenizer.json" in manifest["files"]
    assert len(manifest["source"]["sha256"]) == 64
    by_name = {v["name"]: v for v in manifest["variants"]}
    assert set(by_name) == {"fp32", "fp16"}
    for v in by_name.values():
        assert "cpu" in v["targets"] and v["parity"] is None and v["quantization"] is None
        assert v["export"]["seconds"] > 0
        for rel in v["files"]:
            assert manifest["files"][rel]["bytes"] == (tiny_bundle / rel).stat().st_size
    assert by_name["fp32"]["export"]["check_max_abs"] <= TOL
    fp32 = onnx.load(str(tiny_bundle / by_name["fp32"]["model"]))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in fp32.graph.input}
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["attention_mask"] == ["batch", "past + seq"]
    assert dims["past_key_values.0.key"][0] == "batch" and dims["past_key_values.0.key"][2] == "past"


def test_incremental_decode_equals_full_forward(tiny_bundle):
    session = runtime.load(tiny_bundle)
    ids = np.random.default_rng(0).integers(0, session.config.vocab_size, (1, 20))
    full, _ = session.forward(ids)
    logits, past = session.forward(ids[:, :12])
    steps = [logits]
    for t in range(12, 20):
        logits, past = session.forward(ids[:, t:t + 1], past=past)
        steps.append(logits)
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= TOL
    assert past[0][0].shape[2] == 20


def test_fp16_variant_runs_and_is_close(tiny_bundle):
    s32 = runtime.load(tiny_bundle, precision="fp32")
    s16 = runtime.load(tiny_bundle, precision="fp16")
    ctx = s32.config.context_len
    ids = np.random.default_rng(1).integers(0, s32.config.vocab_size, (1, ctx))  # every position, up to the last
    l32, _ = s32.forward(ids)
    l16, p16 = s16.forward(ids)
    assert l16.dtype == np.float32 and p16[0][0].dtype == np.float16  # fp16 KV cache, logits handed back as fp32
    assert np.isfinite(l16).all()
    assert np.abs(l16 - l32).max() <= 0.05 * max(1.0, float(np.abs(l32).max()))
    assert (l16.argmax(-1) == l32.argmax(-1)).mean() >= 0.9
    step, _ = s16.forward(ids[:, -1:], past=[(k[:, :, :-1], v[:, :, :-1]) for k, v in p16])  # cached step in fp16
    assert np.abs(step[0, -1] - l32[0, -1]).max() <= 0.05 * max(1.0, float(np.abs(l32).max()))


def test_fp16_keeps_position_tables_in_fp32(tiny_bundle):
    """Rotary angles reach ~context_len radians; the fp16 graph must compute cos/sin from fp32 angles."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(tiny_bundle / "fp16" / "model.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)}
    trig = [n for n in model.graph.node if n.op_type in ("Cos", "Sin")]
    assert trig and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in trig)
    assert types["past_key_values.0.key"] == onnx.TensorProto.FLOAT16


def test_fp16_conversion_with_external_data(tiny_bundle, tmp_path):
    from toolkit.export import convert_fp16

    src = tmp_path / "fp32" / "model.onnx"
    onnx.save(onnx.load(str(tiny_bundle / "fp32" / "model.onnx")), str(src.parent.mkdir() or src),
              save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    dst = convert_fp16(src, tmp_path / "fp16" / "model.onnx", external_data=True)
    assert dst.with_name("model.onnx.data").stat().st_size > 0
    cfg = runtime.load(tiny_bundle).config
    ids = np.arange(1, 9)[None]
    l16, _ = runtime.load_model_file(dst, cfg, precision="fp16").forward(ids)
    l32, _ = runtime.load(tiny_bundle).forward(ids)
    assert np.abs(l16 - l32).max() <= 0.05 * max(1.0, float(np.abs(l32).max()))
