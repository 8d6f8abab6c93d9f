"""Static NPU graphs: the float static pair matches PyTorch; the QDQ pair runs entirely on QNN's HTP backend
(CPU fallback disabled), agrees with PyTorch (top-1 >= 0.95 with 16-bit activations) and generates; a prompt
longer than the window is refused; the openvino-npu pre-flight reports a missing device."""

import importlib.util

import numpy as np
import pytest

from toolkit.errors import DataError, TargetUnavailable

HAVE_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None
needs_qnn = pytest.mark.skipif(not HAVE_QNN, reason="onnxruntime-qnn is not installed (pip install edgekit[npu])")
ARCH = dict(context_len=64, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, norm_type="rmsnorm", ffn_type="swiglu")
WINDOW, CACHE = 16, 48


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import make_checkpoint

    from toolkit import checkpoint

    folder = make_checkpoint(tmp_path_factory.mktemp("npu") / "ckpt", steps=150, lr=1e-2, **ARCH)
    model, tok, _ = checkpoint.load(folder)
    return folder, model, tok


@pytest.fixture(scope="module")
def npu_bundle(trained, tmp_path_factory):
    from toolkit.export import export_bundle
    from toolkit.npu import build_qnn_variant

    bundle = export_bundle(trained[0], tmp_path_factory.mktemp("npu-bundle") / "b", fp16=False)
    summary = build_qnn_variant(bundle, window=WINDOW, cache=CACHE, check=HAVE_QNN, log=lambda *_: None)
    return bundle, summary


def _ids(tok, n_docs=40):
    from toolkit.corpus import default_corpus
    from toolkit.data import tokenize_documents

    return tokenize_documents(tok, default_corpus(n_docs, seed=123), tok.token_to_id("<|eos|>"))


def test_static_pair_is_npu_ready(npu_bundle):
    """The float pair matched PyTorch when it was built (right padding, prompt + decode steps); the QDQ
    graphs in the bundle have static shapes, finite constants and no Reciprocal (rewritten to Div)."""
    import onnx

    from toolkit.static_export import static_problems

    bundle, summary = npu_bundle
    assert summary["float_pair_max_abs_vs_torch"] < 1e-4
    for name in ("prefill", "decode"):
        graph = onnx.load(str(bundle / "qnn-htp" / f"{name}.onnx"))
        assert static_problems(graph) == []
        ops = {n.op_type for n in graph.graph.node}
        assert "Reciprocal" not in ops and "QuantizeLinear" in ops


def test_static_problems_are_found():
    from onnx import TensorProto, helper

    from toolkit.static_export import static_problems

    inf = helper.make_tensor("big", TensorProto.FLOAT, [1], [float("-inf")])
    graph = helper.make_graph([helper.make_node("Add", ["x", "big"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [inf])
    problems = static_problems(helper.make_model(graph))
    assert any("dynamic shape" in p for p in problems) and any("inf/nan" in p for p in problems)


def test_variant_is_recorded_as_static(npu_bundle):
    from toolkit.bundle import Bundle

    bundle, summary = npu_bundle
    v = Bundle.open(bundle).variant("a16w8", "qnn-htp")
    assert v.export["static"] and (v.export["window"], v.export["cache"]) == (WINDOW, CACHE)
    assert v.export["prefill"] in v.files and v.export["decode"] in v.files
    assert v.quantization["prefill"]["activations"] == "uint16"
    assert summary["float_pair_max_abs_vs_torch"] < 1e-4


@needs_qnn
def test_every_node_on_qnn_and_agreement_with_pytorch(npu_bundle, trained):
    from toolkit import runtime
    from toolkit.npu import reference_agreement
    from toolkit.runtime.static import StaticSession, assignment

    bundle, summary = npu_bundle
    assert summary["prefill_top1_vs_float"] >= 0.75 and summary["decode_top1_vs_float"] >= 0.75  # a few samples only
    session = runtime.load(bundle, target="qnn-htp", precision="a16w8")
    assert isinstance(session, StaticSession) and session.device == "QNNExecutionProvider"
    for graph in (session.prefill_graph, session.decode_graph):
        counts = assignment(graph.sess)
        assert set(counts) == {"QNNExecutionProvider"} and counts["QNNExecutionProvider"] > 50
    _, model, tok = trained
    result = reference_agreement(session, model, _ids(tok), n_windows=6)
    print("qnn-htp top-1 agreement with PyTorch:", result)
    assert result["top1_agreement"] >= 0.95


@needs_qnn
def test_generate_on_qnn(npu_bundle, trained, capsys):
    import torch

    from toolkit import runtime
    from toolkit.cli import main

    bundle, _ = npu_bundle
    _, model, tok = trained
    session = runtime.load(bundle, target="qnn-htp", precision="a16w8")
    prompt = "Once upon a time"
    ids = tok.encode(prompt, add_special_tokens=False).ids
    got = list(session.generate_ids(ids, max_new_tokens=12))
    want = list(model.generate(torch.tensor([ids]), 12, eos_id=session.eos_id))
    assert len(got) >= 1
    assert np.mean([a == b for a, b in zip(got, want)]) >= 0.5 and got[0] == want[0]
    # left padding computes the same thing
    left = runtime.static.load_static(bundle, "qnn-htp", "a16w8", padding="left")
    assert list(left.generate_ids(ids, max_new_tokens=4))[:2] == got[:2]
    assert main(["generate", str(bundle), prompt, "--target", "qnn-htp", "--precision", "a16w8",
                 "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt) and "LIBNATIVE" not in out


@needs_qnn
def test_prompt_longer_than_window_is_refused(npu_bundle):
    from toolkit import runtime
    from toolkit.tokenizer import encode

    session = runtime.load(npu_bundle[0], target="qnn-htp", precision="a16w8")
    words = "the little fox ran to the big tree and sat down in the sun".split()
    long_prompt = ""
    while len(encode(session.tokenizer, long_prompt)) <= WINDOW:  # longer than the window, shorter than the context
        long_prompt = (long_prompt + " " + words[len(long_prompt.split()) % len(words)]).strip()
    with pytest.raises(DataError, match=f"at most {WINDOW}"):
        session.generate(long_prompt, max_new_tokens=2)
    with pytest.raises(DataError, match="window"):
        session.prefill(list(range(WINDOW + 1)))
    logits, cache = session.forward(np.arange(WINDOW + 5)[None] % 50 + 10)  # forward: prefill + decode steps
    assert logits.shape[1] == WINDOW + 5 and cache.slot == WINDOW + 5


@needs_qnn
def test_cpu_fallback_is_refused(tmp_path):
    """A node the HTP cannot take makes the session fail: nothing runs half on the CPU."""
    import onnx
    from onnx import TensorProto, helper

    from toolkit import targets
    from toolkit.runtime.static import ort_session

    graph = helper.make_graph([helper.make_node("Det", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "det.onnx")
    with pytest.raises(TargetUnavailable, match="qnn-htp"):
        ort_session(tmp_path / "det.onnx", targets.get("qnn-htp"))


def test_qnn_target_unavailable_without_plugin(npu_bundle, monkeypatch):
    import sys

    from toolkit import probe, runtime

    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)
    monkeypatch.setattr(probe, "_REGISTERED", {})
    with pytest.raises(TargetUnavailable, match="edgekit\\[npu\\]"):
        runtime.load(npu_bundle[0], target="qnn-htp", precision="a16w8")


def test_openvino_npu_preflight_and_missing_device(npu_bundle, monkeypatch):
    from toolkit import probe, runtime
    from toolkit.npu import build_openvino_npu_variant

    if probe._import("openvino") is None:
        pytest.skip("openvino is not installed (pip install edgekit[openvino])")
    if probe.availability(__import__("toolkit").targets.get("openvino-npu"))[0]:
        pytest.skip("this machine has an Intel NPU")
    bundle, _ = npu_bundle
    summary = build_openvino_npu_variant(bundle, window=WINDOW, cache=CACHE, log=lambda *_: None)
    assert summary["device"]["usable"] is False and "device NPU not present" in summary["device"]["reason"]
    with pytest.raises(TargetUnavailable, match="device NPU not present"):
        runtime.load(bundle, target="openvino-npu", precision="fp16")


@needs_qnn
def test_first_divergence_on_qnn_names_the_perturbed_layer(npu_bundle, trained, tmp_path):
    """The first-divergence search runs on the NPU graphs themselves: the honest QDQ prefill graph has no
    hidden state beyond the a16w8 localisation tolerance on qnn-htp; one whose layers.1 post-attention norm
    weight is tripled (its quantization scale) is located at block 1, with block 0 still within tolerance."""
    import onnx
    from onnx import numpy_helper

    from toolkit import targets
    from toolkit.parity_debug import locate_static

    bundle, _ = npu_bundle
    _, model, tok = trained
    ids = np.asarray(_ids(tok)[: WINDOW + 8], np.int64)[None]  # longer than the window: the first W are used
    qnn = targets.get("qnn-htp")
    prefill = bundle / "qnn-htp" / "prefill.onnx"
    honest = locate_static(prefill, WINDOW, qnn, model, ids, "a16w8", 0.1)
    print("honest", [e["rel_err"] for e in honest["per_layer"]])
    assert honest["status"] == "none" and honest["method"] == "graph-surgery", honest
    assert len(honest["per_layer"]) == 3 and all(e["rel_err"] < 0.1 for e in honest["per_layer"])

    graph = onnx.load(str(prefill))
    (scale,) = [t for t in graph.graph.initializer if t.name == "model.layers.1.post_attention_layernorm.weight_scale"]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 3, scale.name))
    onnx.save(graph, str(tmp_path / "bad.onnx"))
    bad = locate_static(tmp_path / "bad.onnx", WINDOW, qnn, model, ids, "a16w8", 0.1)
    print("bad", [e["rel_err"] for e in bad["per_layer"]])
    assert bad["status"] == "found" and bad["layer"] == 1 and bad["hidden_state"] == 2, bad
    assert bad["per_layer"][1]["rel_err"] < 0.1 < bad["per_layer"][2]["rel_err"]


@needs_qnn
def test_failing_qnn_parity_runs_the_search_on_the_prefill_graph(npu_bundle, monkeypatch):
    """A qnn-htp result that fails its thresholds (here an impossible max_abs limit) carries a
    first-divergence search done on the static prefill graph, not an "n/a"."""
    import dataclasses

    from toolkit import parity

    profiles = parity.target_profiles.all_targets()
    strict = dataclasses.replace(profiles["qnn-htp"], thresholds={
        "a16w8": {**profiles["qnn-htp"].thresholds["a16w8"], "max_abs_max": 1e-9}})
    monkeypatch.setattr(parity.target_profiles, "all_targets", lambda *a: {**profiles, "qnn-htp": strict})
    report = parity.run(npu_bundle[0], targets=["qnn-htp"], windows=2, decode_steps=4, record=False, log=lambda *_: None)
    (r,) = report["results"]
    assert r["status"] == "fail" and "max_abs" in r["reason"]
    fd = r["first_divergence"]
    assert fd["method"] == "graph-surgery" and fd["status"] in ("none", "found"), fd
    assert len(fd["per_layer"]) == 3 and all(e["rel_err"] is not None for e in fd["per_layer"])
