"""INT8 with ONNX Runtime (CPU): dynamic quantization and static QDQ quantization.

dynamic  `quantize_dynamic(per_channel=True, weight_type=QInt8)` on MatMul (constant weights only) and
         Gather (the embedding table): weights int8 per output channel; activations are quantized to
         uint8 at run time, per call (MatMulInteger / DynamicQuantizeMatMul).
static   `quantize_static(quant_format=QDQ, per_channel=True)`: int8 per-channel weights, activations with
         ranges calibrated on text windows (CalibrationMethod MinMax | Entropy | Percentile) stored as
         uint8 or uint16 QuantizeLinear/DequantizeLinear pairs. Only MatMuls with a constant weight are
         quantized (MatMulConstBOnly): quantizing attention scores/values to 8 bits costs accuracy for no
         weight memory.
"""

from __future__ import annotations

import contextlib
import io

from ..errors import QuantizationError
from .graph import finish

OP_TYPES = ["MatMul"]
EMBED_BLOCK = 128  # embedding values per 8-bit scale (a divisor of d_model is used when 128 is not)


def _first(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def _embeddings(job):
    """Embedding Gathers to quantize (not kept in float). ORT's quantizers would store the table per
    tensor (dynamic: one int8 scale; QDQ: as an activation, one uint8/uint16 scale), which costs ~0.5 pp of
    top-1 on `small`; they are excluded there and replaced by _embed8 instead."""
    _, layers, kept, _ = job.prepared()
    return [l for l in layers if l.kind == "embedding" and l.node not in kept]


def _embed8(job, tables) -> dict:
    """Replace each embedding Gather of job.output by an 8-bit GatherBlockQuantized (uint8, one scale and
    zero point per EMBED_BLOCK values of a row)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    if not tables:
        return {}
    model = onnx.load(str(job.output))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    done = []
    for layer in tables:
        node = nodes.get(layer.node)
        if node is None or node.op_type != "Gather" or node.input[0] not in inits:
            continue
        W = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        V, D = W.shape
        bs = next(b for b in (EMBED_BLOCK, 64, 32, 16, D) if D % b == 0)
        Wb = W.reshape(V, D // bs, bs)
        lo, hi = np.minimum(Wb.min(-1), 0.0), np.maximum(Wb.max(-1), 0.0)
        scale = np.maximum(hi - lo, 1e-12) / 255.0
        zp = np.clip(np.round(-lo / scale), 0, 255).astype(np.uint8)
        q = np.clip(np.round(Wb / scale[..., None]) + zp[..., None], 0, 255).astype(np.uint8).reshape(V, D)
        base = node.input[0] + "_q8"
        graph.initializer.extend([numpy_helper.from_array(q, base), numpy_helper.from_array(scale.astype(np.float32), base + "_scales"),
                                  numpy_helper.from_array(zp, base + "_zero_points")])
        new = helper.make_node("GatherBlockQuantized", [base, node.input[1], base + "_scales", base + "_zero_points"],
                               list(node.output), name=node.name + "_Q8", domain="com.microsoft", bits=8, block_size=bs,
                               gather_axis=0, quantize_axis=1)
        graph.node.insert(list(graph.node).index(node), new)
        graph.node.remove(node)
        done.append({"layer": layer.name, "block_size": bs})
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    from .graph import prune

    prune(model)
    onnx.save(model, str(job.output))
    return {"embedding": [f"{d['layer']}: uint8 GatherBlockQuantized, blocks of {d['block_size']} per row" for d in done]}


def dynamic(job):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _, _, _, src = job.prepared()
    tables = _embeddings(job)
    try:
        quantize_dynamic(str(src), str(job.output), op_types_to_quantize=["MatMul"], per_channel=True,
                         reduce_range=False, weight_type=QuantType.QInt8, nodes_to_exclude=job.exclude_nodes(),
                         extra_options={"MatMulConstBOnly": True})
    except Exception as exc:
        raise QuantizationError(f"quantize_dynamic failed: {_first(exc)}") from exc
    record = {"tool": "onnxruntime.quantization.quantize_dynamic",
              "settings": {"weights": "int8, per channel (symmetric)", "activations": "uint8, dynamic (per call)",
                           "op_types": ["MatMul"], "MatMulConstBOnly": True, "reduce_range": False,
                           **_embed8(job, tables)}}
    return finish(job, job.output, record)


def static(job):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .calibration import feeds, ort_reader

    _, _, _, src = job.prepared()
    cal = job.calibration()
    method = job.options.value("calibration_method")
    act = job.options.value("activation_type")
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    act_type = {"uint8": QuantType.QUInt8, "uint16": QuantType.QUInt16}[act]
    extra = {"MatMulConstBOnly": True, "WeightSymmetric": True}
    tables = _embeddings(job)
    if act == "uint16":
        extra["UseQDQContribOps"] = False  # opset >= 21 graphs carry 16-bit Q/DQ natively
    job.log(f"calibrating ({method}, {act} activations) on {cal.windows} windows of {cal.window} tokens from {cal.source}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # histogram calibrators print progress on stdout
            quantize_static(str(src), str(job.output), ort_reader(feeds(cal, job.cfg)), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=OP_TYPES, per_channel=True, reduce_range=False,
                            activation_type=act_type, weight_type=QuantType.QInt8,
                            nodes_to_exclude=job.exclude_nodes() + [l.node for l in tables],
                            calibrate_method=calibrate, extra_options=extra)
    except QuantizationError:
        raise
    except Exception as exc:
        raise QuantizationError(f"quantize_static failed: {_first(exc)}") from exc
    record = {"tool": "onnxruntime.quantization.quantize_static (QDQ)",
              "settings": {"weights": "int8, per channel (symmetric)", "activations": f"{act}, static (calibrated)",
                           "calibration_method": method, "op_types": OP_TYPES, "MatMulConstBOnly": True,
                           **_embed8(job, tables)},
              "calibration": cal.describe()}
    return finish(job, job.output, record)
