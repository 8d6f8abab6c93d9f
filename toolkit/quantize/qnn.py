"""qnn-htp (Qualcomm HTP through ONNX Runtime's QNN EP): static-shape QDQ pair, a16w8.

The builder lives in toolkit/npu.py (`build_qnn_variant`: static prefill/decode export, calibration on
real caches, `get_qnn_qdq_config(activation_type=QUInt16, weight_type=QUInt8)`); `edgekit quantize BUNDLE
--target qnn-htp [--calibration PATH]` calls it, so every quantized variant is made by one command. It
writes into a temporary folder inside the bundle and registers the variant last, like the other methods.
"""

from __future__ import annotations


def build_variant(bundle_path, options, log=print) -> dict:
    from ..bundle import Bundle
    from ..npu import build_qnn_variant
    from . import fp32_bytes

    s = build_qnn_variant(bundle_path, calibration=options.calibration, log=log)
    lines = [f"  {k}: {v}" for k, v in s.items() if k not in ("variant", "precision")]
    out = {"variant": s["variant"], "precision": s["precision"], "method": "qnn-qdq", "target": "qnn-htp",
           "summary": s, "lines": lines}
    bundle = Bundle.open(bundle_path, verify=False)
    variant = next((v for v in bundle.variants if v.name == s["variant"]), None)
    if variant is not None:  # sizes as every other method reports them
        out["bytes"] = bundle.variant_bytes(variant)
        out["ratio_to_fp32"] = round(out["bytes"] / fp32_bytes(bundle), 4)
    return out
