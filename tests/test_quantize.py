"""Quantization (ONNX Runtime methods): every method gives a variant the runtime loads and that passes the
cpu target's thresholds on a tiny trained model; the float-layer report is right; failures and bad input
leave the bundle byte-identical. OpenVINO methods: tests/test_quantize_openvino.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from toolkit.cli import main
from toolkit.errors import QuantizationError
from toolkit.quantize import METHODS, Options, quantize


def tree_hashes(root: Path) -> dict:
    """relpath -> sha256 of every file under root (temporary folders included, so leftovers show)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def quiet(*_):
    pass


@pytest.mark.parametrize("precision,method", [("int8", "ort-int8-dynamic"), ("int8", "ort-int8-static"),
                                              ("int4", "ort-int4-rtn"), ("int4", "ort-int4-hqq")])
def test_method_passes_thresholds_and_runs(bundle_copy, precision, method):
    from toolkit import runtime

    s = quantize(bundle_copy, precision, method, check=True, windows=4, decode_steps=8, log=quiet)
    rec = s["record"]
    assert rec["quality"]["status"] == "pass", rec["quality"]
    assert rec["smoke"]["status"] == "ok"
    v = next(v for v in manifest(bundle_copy)["variants"] if v["name"] == precision)
    assert v["precision"] == precision and v["targets"] == ["cpu"] and v["quantization"]["method"] == method
    session = runtime.load(bundle_copy, target="cpu", precision=precision)  # verifies the manifest too
    assert session.generate("Once upon a time", max_new_tokens=4) is not None
    assert 0 < s["ratio_to_fp32"] < 1


def test_gptq_passes_and_shares_the_tied_table(bundle_copy):
    s = quantize(bundle_copy, "int4", "ort-int4-gptq", check=True, windows=4, decode_steps=8, log=quiet)
    assert s["record"]["quality"]["status"] == "pass"
    assert s["record"]["calibration"]["windows"] >= 4 and "shared_embedding" in s["record"]


@pytest.mark.parametrize("sym", [False, True])
def test_gptq_reduces_output_error_and_packs_for_matmulnbits(sym):
    """GPTQ must beat round-to-nearest on correlated activations (ORT's bundled GPTQ does not: it equals
    RTN), and its packed tables must compute x @ dequant(W) in ORT's MatMulNBits (K = 96: odd group count)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from toolkit.quantize.gptq import _params, gptq, pack

    rng = np.random.default_rng(0)
    K, N, g = 96, 48, 32
    X = rng.standard_normal((512, K)) @ rng.standard_normal((K, K)) * 0.3
    W = rng.standard_normal((K, N)).astype(np.float32)
    codes, S, Z = gptq(W, 2 / len(X) * X.T @ X, g, sym)
    deq = ((codes.T.reshape(N, -1, g).astype(np.float64) - Z[:, :, None]) * S[:, :, None]).reshape(N, K).T
    Wt, R = W.T.astype(np.float64), np.zeros((N, K))
    for j in range(0, K, g):
        sc, z = _params(Wt[:, j:j + g], sym)
        R[:, j:j + g] = (np.clip(np.round(Wt[:, j:j + g] / sc[:, None]) + z[:, None], 0, 15) - z[:, None]) * sc[:, None]
    mse = lambda A: float(np.mean((X @ A - X @ W) ** 2))  # noqa: E731
    assert mse(deq) < 0.7 * mse(R.T)
    B, S2, Zp = pack(codes, S, Z, g)
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft", K=K, N=N, bits=4, block_size=g)
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(B, "B"), numpy_helper.from_array(S2, "S"), numpy_helper.from_array(Zp, "Z")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    x = X[:8].astype(np.float32)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(y - x @ deq).max() < 1e-3


def _graph(bundle: Path, variant: str):
    import onnx

    return onnx.load(str(bundle / variant / "model.onnx"))


def test_float_layers_report(bundle_copy):
    s = quantize(bundle_copy, "int4", "ort-int4-rtn", options=Options(keep_float=("lm_head", "first")), log=quiet)
    layers = s["record"]["layers"]
    floats = {f["layer"]: f["reason"] for f in layers["float_layers"]}
    expected = {"lm_head"} | {f"layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                         "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")}
    weight_floats = {n for n, f in zip(floats, layers["float_layers"]) if f["shape"]}
    assert weight_floats == expected
    assert all(floats[n].startswith("excluded by request") for n in expected)
    attention = [f for f in layers["float_layers"] if f["shape"] is None]
    assert len(attention) == 4 and all("no constant weight" in f["reason"] for f in attention)
    # independently: the graph holds exactly these float MatMuls with a float initializer weight
    g = _graph(bundle_copy, "int4").graph
    inits = {t.name: t for t in g.initializer}
    float_mm = {n.name for n in g.node if n.op_type == "MatMul" and n.input[1] in inits and inits[n.input[1]].data_type == 1}
    assert float_mm == {f["node"] for f in layers["float_layers"] if f["shape"]}
    nbits = [n for n in g.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(layers["quantized_layers"]) - 1  # + the embedding's GatherBlockQuantized
    assert any(n.op_type == "GatherBlockQuantized" for n in g.node)
    # the kept head has its own fp32 copy; the embedding is still 4-bit
    assert "embed_tokens" in {q["layer"] for q in layers["quantized_layers"]}


def test_tied_embedding_shares_the_head_table(bundle_copy):
    s = quantize(bundle_copy, "int4", log=quiet)  # default: ort-int4-rtn, group 32, asymmetric
    assert s["method"] == "ort-int4-rtn" and "shared_embedding" in s["record"]
    g = _graph(bundle_copy, "int4").graph
    gbq = next(n for n in g.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in g.node if n.op_type == "MatMulNBits" and n.name.startswith("node_linear_12"))
    producer = {o: n for n in g.node for o in n.output}
    assert producer[gbq.input[0]].op_type == "Reshape" and producer[gbq.input[0]].input[0] == head.input[1]
    assert gbq.input[2] == head.input[2]  # same scales
    assert not any(t.data_type == 1 and len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 320 * 32 for t in g.initializer)


def test_accuracy_level_and_padding(bundle_copy):
    """accuracy_level 4 (int8 activations) is the default; 0 leaves the fp32-compute kernels."""
    quantize(bundle_copy, "int4", "ort-int4-rtn", options=Options(group_size=64, accuracy_level=0), log=quiet)
    levels = {a.i for n in _graph(bundle_copy, "int4").graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels <= {0}
    s = quantize(bundle_copy, "int4", "ort-int4-rtn", options=Options(group_size=64), log=quiet)
    g = _graph(bundle_copy, "int4").graph
    assert any(n.op_type == "MatMulNBits" for n in g.node)
    for n in g.node:
        if n.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in n.attribute}
            assert attrs["accuracy_level"] == 4 and attrs["block_size"] == 64
    padded = s["record"]["padded"]  # d_model 32 < 64: K = 32 layers are padded to one 64-block, and reported
    assert padded and all(p["K"] % 64 and p["padded_to"] == 64 for p in padded if p["K"] == 32)
    assert any("padded" in line for line in s["lines"])


def test_failed_quantization_leaves_bundle_identical(bundle_copy, monkeypatch):
    import toolkit.quantize as q

    before = tree_hashes(bundle_copy)

    def boom(*a, **k):
        raise QuantizationError("simulated failure after the model was written")

    monkeypatch.setattr(q, "smoke", boom)
    with pytest.raises(QuantizationError, match="simulated"):
        quantize(bundle_copy, "int4", log=quiet)
    assert tree_hashes(bundle_copy) == before


def test_failed_registration_restores_the_replaced_variant(bundle_copy, monkeypatch):
    from toolkit.bundle import Bundle, BundleError

    quantize(bundle_copy, "int4", log=quiet)
    before = tree_hashes(bundle_copy)

    def boom(*a, **k):
        raise BundleError("simulated manifest failure")

    monkeypatch.setattr(Bundle, "add_variant", boom)
    with pytest.raises(BundleError, match="simulated"):
        quantize(bundle_copy, "int4", options=Options(group_size=16), log=quiet)
    assert tree_hashes(bundle_copy) == before
    monkeypatch.undo()
    Bundle.open(bundle_copy)


def test_search_with_nothing_passing_adds_nothing(bundle_copy):
    from toolkit.errors import ParityFailure

    before = tree_hashes(bundle_copy)
    with pytest.raises(ParityFailure):
        quantize(bundle_copy, "int4", "ort-int4-rtn", options=Options(group_size=32, symmetric=True), search=True,
                 max_ppl_delta=-100.0, windows=2, decode_steps=4, log=quiet)
    assert tree_hashes(bundle_copy) == before


def test_search_keeps_smallest_passing(bundle_copy, capsys):
    rc = main(["quantize", str(bundle_copy), "--precision", "int8", "--search", "--windows", "2", "--decode-steps", "4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "recipe" in out and "chosen:" in out
    rec = next(v for v in manifest(bundle_copy)["variants"] if v["name"] == "int8")["quantization"]
    table = rec["search"]["table"]
    measured = [r for r in table if r["status"] in ("pass", "fail")]
    passing = [r for r in measured if r["status"] == "pass"]
    assert passing and rec["search"]["chosen"] == passing[0]["recipe"]
    assert all(r["bytes"] >= passing[0]["bytes"] for r in table if r["bytes"] is not None)


# --- bad input: one clear line, non-zero exit, bundle unchanged --------------------------------------------
def _bad(bundle, args, capsys, match):
    before = tree_hashes(bundle)
    rc = main(["quantize", str(bundle)] + args)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("edgekit quantize: error:") and match in err, err
    assert tree_hashes(bundle) == before


def test_bad_calibration(bundle_copy, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _bad(bundle_copy, ["--precision", "int8", "--method", "ort-int8-static", "--calibration", str(empty)], capsys, "empty")
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "   "}\n{"text": ""}\n')
    _bad(bundle_copy, ["--precision", "int8", "--method", "ort-int8-static", "--calibration", str(blank)], capsys, "empty")
    small = tmp_path / "small.txt"
    small.write_text("Once upon a time there was a cat.")
    _bad(bundle_copy, ["--precision", "int8", "--method", "ort-int8-static", "--calibration", str(small)], capsys,
         "at least")
    _bad(bundle_copy, ["--precision", "int4", "--method", "ort-int4-gptq", "--symmetric", "--calibration",
                       str(tmp_path / "missing.txt")], capsys, "not found")


def test_calibration_tokenizing_to_nothing(bundle_copy, tmp_path):
    from toolkit.bundle import Bundle
    from toolkit.quantize.calibration import load_calibration

    class NoTokens:  # a tokenizer that drops everything (e.g. text of characters outside its alphabet)
        def token_to_id(self, t):
            return 0

        def encode_batch(self, docs, add_special_tokens=False):
            return [type("E", (), {"ids": []})() for _ in docs]

    text = tmp_path / "t.txt"
    text.write_text("some text\n")
    b = Bundle.open(bundle_copy)
    with pytest.raises(QuantizationError, match="tokenizes to nothing"):
        load_calibration(b, NoTokens(), text, b.model_config)


def test_precision_the_target_cannot_run(bundle_copy, capsys):
    _bad(bundle_copy, ["--precision", "int4", "--target", "qnn-htp"], capsys, "cannot run precision")
    _bad(bundle_copy, ["--precision", "a16w8"], capsys, "cannot run precision")
    _bad(bundle_copy, ["--precision", "fp16"], capsys, "no quantization method")
    _bad(bundle_copy, ["--precision", "int4", "--method", "ort-int8-dynamic"], capsys, "makes int8")
    _bad(bundle_copy, ["--precision", "int4", "--target", "openvino-npu"], capsys, "npu-build")


def test_bad_options(bundle_copy, capsys):
    _bad(bundle_copy, ["--precision", "int4", "--group-size", "48"], capsys, "--group-size 48")
    _bad(bundle_copy, ["--precision", "int4", "--accuracy-level", "7"], capsys, "--accuracy-level")
    _bad(bundle_copy, ["--precision", "int8", "--group-size", "32"], capsys, "does not apply")
    _bad(bundle_copy, ["--precision", "int4", "--keep-float", "layers.9.*"], capsys, "matches no weight layer")
    _bad(bundle_copy, ["--precision", "int4", "--calibration", "x.txt"], capsys, "data-free")


def test_methods_registry_is_consistent():
    from toolkit.quantize import DEFAULTS
    from toolkit.targets import PRECISIONS

    for name, m in METHODS.items():
        assert m.name == name and all(p in PRECISIONS for p in m.precisions)
    for (precision, runtime), name in DEFAULTS.items():
        assert precision in METHODS[name].precisions and METHODS[name].runtime == runtime


def test_qnn_target_calls_the_npu_builder(bundle_copy, monkeypatch, tmp_path, capsys):
    import toolkit.npu as npu

    seen = {}

    def fake(bundle, calibration=None, window=0, cache=0, checkpoint=None, check=True, log=print):
        seen.update(bundle=str(bundle), calibration=calibration)
        return {"variant": "qnn-htp", "precision": "a16w8", "window": 16, "cache": 64}

    monkeypatch.setattr(npu, "build_qnn_variant", fake)
    calib = tmp_path / "c.txt"
    rc = main(["quantize", str(bundle_copy), "--target", "qnn-htp", "--calibration", str(calib)])
    assert rc == 0 and seen == {"bundle": str(bundle_copy), "calibration": str(calib)}
    assert "qnn-htp" in capsys.readouterr().out
