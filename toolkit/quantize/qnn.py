"""qnn-htp (Qualcomm HTP through ONNX Runtime's QNN EP): static-shape QDQ pair, a16w8.

The builder lives in toolkit/npu.py (`build_qnn_variant`: static prefill/decode export, calibration on
real caches, `get_qnn_qdq_config(activation_type=QUInt16, weight_type=QUInt8)`); `edgekit quantize BUNDLE
--target qnn-htp [--calibration PATH]` calls it, so every quantized variant is made by one command. It
writes into a temporary folder inside the bundle and registers the variant last, like the other methods.
"""

from __future__ import annotations


def build_variant(bundle_path, options, log=print) -> dict:
    from ..npu import build_qnn_variant

    s = build_qnn_variant(bundle_path, calibration=options.calibration, log=log)
    lines = [f"  {k}: {v}" for k, v in s.items() if k not in ("variant", "precision")]
    return {"variant": s["variant"], "precision": s["precision"], "method": "qnn-qdq", "target": "qnn-htp",
            "summary": s, "lines": lines}
