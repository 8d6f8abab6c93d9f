"""OpenVINO quantization (IR, NNCF weight compression, NNCF full INT8) on the openvino-cpu target.
Skipped when openvino / nncf are not installed."""

from __future__ import annotations

import json

import pytest

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install openvino nncf)")
pytest.importorskip("nncf", reason="nncf is not installed (pip install nncf)")

from toolkit.errors import BundleError, QuantizationError  # noqa: E402
from toolkit.quantize import Options, quantize  # noqa: E402

from test_quantize import _bad, quiet, tree_hashes  # noqa: E402


@pytest.mark.parametrize("precision,method", [("int8", "ov-int8-weights"), ("int4", "ov-int4-weights"),
                                              ("int4", "ov-int4-awq"), ("int8", "ov-int8-static")])
def test_openvino_method_passes_and_runs(bundle_copy, precision, method):
    from toolkit import runtime

    s = quantize(bundle_copy, precision, method, check=True, windows=4, decode_steps=8, log=quiet)
    assert s["variant"] == f"openvino-cpu-{precision}" and s["target"] == "openvino-cpu"
    assert s["record"]["quality"]["status"] == "pass", s["record"]["quality"]
    m = json.loads((bundle_copy / "manifest.json").read_text())
    v = next(v for v in m["variants"] if v["name"] == s["variant"])
    assert v["model"].endswith("model.xml") and v["model"][:-4] + ".bin" in v["files"]
    session = runtime.load(bundle_copy, target="openvino-cpu", precision=precision)  # Bundle.open verifies .xml/.bin
    assert session.device == "openvino:CPU"
    assert session.generate("Once upon a time", max_new_tokens=4) is not None
    layers = s["record"]["layers"]
    assert layers["quantized_fraction"] == 1.0 and not [f for f in layers["float_layers"] if f["shape"]]


def test_ir_fp16_and_tampered_bin(bundle_copy):
    from toolkit.bundle import Bundle

    s = quantize(bundle_copy, "fp16", "ov-ir", check=True, windows=2, decode_steps=4, log=quiet)
    assert s["variant"] == "openvino-cpu-fp16" and s["record"]["settings"]["compress_to_fp16"]
    assert all("compress_to_fp16" in f["reason"] for f in s["record"]["layers"]["float_layers"] if f["shape"])
    Bundle.open(bundle_copy)
    binf = bundle_copy / "openvino-cpu-fp16" / "model.bin"
    data = bytearray(binf.read_bytes())
    data[0] ^= 1
    binf.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="changed"):
        Bundle.open(bundle_copy)


def test_keep_float_maps_to_ignored_scope(bundle_copy):
    s = quantize(bundle_copy, "int4", "ov-int4-weights", options=Options(keep_float=("lm_head",)), log=quiet)
    floats = [f for f in s["record"]["layers"]["float_layers"] if f["shape"]]
    assert [f["layer"] for f in floats] == ["lm_head"] and floats[0]["reason"].startswith("excluded by request")


def test_group_size_not_dividing_is_refused(bundle_copy, capsys):
    # d_model is 32: groups of 64 cannot tile a 32-wide input; NNCF cannot pad, so the request is refused
    _bad(bundle_copy, ["--precision", "int4", "--target", "openvino-cpu", "--group-size", "64"], capsys,
         "does not divide")


def test_failed_openvino_build_leaves_bundle_identical(bundle_copy, monkeypatch):
    import toolkit.quantize.openvino as ovq

    before = tree_hashes(bundle_copy)

    def boom(*a, **k):
        raise QuantizationError("simulated NNCF failure")

    monkeypatch.setattr(ovq, "_save", boom)
    with pytest.raises(QuantizationError, match="simulated"):
        quantize(bundle_copy, "int8", "ov-int8-weights", log=quiet)
    assert tree_hashes(bundle_copy) == before


def test_first_divergence_inside_an_ir_variant(bundle_copy, tiny_checkpoint, tmp_path):
    """The search runs inside OpenVINO IR variants: an honest fp32 IR has every hidden state within 1e-4 of
    PyTorch on openvino-cpu; an IR converted from an export whose layers.1 MLP was scaled fails parity and
    the search, done in the IR itself, names block 1."""
    import numpy as np
    import torch

    from toolkit import checkpoint, parity, targets
    from toolkit.parity_debug import locate_ir

    from test_parity import _bundle_from_model

    model, _, ckpt = checkpoint.load(tiny_checkpoint)
    ids = np.arange(5, 37, dtype=np.int64)[None]
    quantize(bundle_copy, "fp32", "ov-ir", log=quiet)
    honest = locate_ir(bundle_copy / "openvino-cpu-fp32" / "model.xml", bundle_copy / "fp32" / "model.onnx",
                       targets.get("openvino-cpu"), model, ids, "fp32", 1e-4)
    assert honest["status"] == "none" and all(e["rel_err"] < 1e-4 for e in honest["per_layer"]), honest

    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight.mul_(1.5)
    bad = _bundle_from_model(model, ckpt, tmp_path / "bad")
    quantize(bad, "fp32", "ov-ir", log=quiet)
    report = parity.run(bad, targets=["openvino-cpu"], precisions=["fp32"], windows=2, decode_steps=4, record=False,
                        log=quiet)
    (r,) = report["results"]
    assert r["status"] == "fail" and r["variant"] == "openvino-cpu-fp32", r["reason"]
    fd = r["first_divergence"]
    assert fd["status"] == "found" and fd["layer"] == 1 and fd["hidden_state"] == 2, fd
    assert fd["method"] == "graph-surgery" and fd["per_layer"][1]["rel_err"] < 1e-5 < fd["per_layer"][2]["rel_err"]
