"""OpenVINO variants (target openvino-cpu): IR conversion, NNCF weight compression and full INT8.

ir               openvino.convert_model(fp32 ONNX) + save_model: fp32 IR, or fp16 (compress_to_fp16: fp16
                 weights, computed in the precision the plugin picks)
weights_int8     nncf.compress_weights(INT8_ASYM | INT8_SYM): int8 per-channel weights, data-free
weights_int4     nncf.compress_weights(INT4_ASYM | INT4_SYM, group_size, ratio=1, all_layers=True): every
                 weight layer, embedding and output head included, in 4-bit groups; data-free
weights_int4_awq as weights_int4 plus AWQ and scale estimation on calibration windows (nncf.Dataset)
quantize_int8    nncf.quantize(model_type=TRANSFORMER): int8 weights and activations (FakeQuantize),
                 calibrated on text windows

All start from the prepared fp32 graph (tied output head untied, so the head gets its own compressed
weight). --keep-float maps to NNCF's ignored_scope (by ONNX node name). NNCF cannot pad a group: a group
size that does not divide a layer's input width is refused with the list of such layers.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from ..errors import QuantizationError
from .graph import format_report, layer_report

INT_TYPES = ("u8", "i8", "u4", "i4", "nf4", "u2", "i2", "f8e4m3", "f8e5m2", "f4e2m1")


def _first(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def _ov():
    try:
        import openvino as ov
    except ImportError:
        raise QuantizationError("OpenVINO is not installed: pip install openvino nncf") from None
    return ov


def _nncf():
    try:
        import nncf
    except ImportError:
        raise QuantizationError("NNCF is not installed: pip install nncf") from None
    return nncf


def _convert(path: Path):
    ov = _ov()
    try:
        return ov.convert_model(str(path))
    except Exception as exc:
        raise QuantizationError(f"OpenVINO cannot convert {path.name}: {_first(exc)}") from exc


def _save(model, job, fp16: bool = False) -> list[Path]:
    ov = _ov()
    xml = job.work / "model.xml"
    ov.save_model(model, str(xml), compress_to_fp16=fp16)
    return [xml, xml.with_suffix(".bin")]


def _dataset(job):
    from .calibration import feeds

    nncf = _nncf()
    cal = job.calibration()
    items = feeds(cal, job.cfg)
    return nncf.Dataset(items), cal, len(items)


def _ignored(job, model):
    """--keep-float layers as an NNCF IgnoredScope of OpenVINO op names (the ONNX frontend names an op after
    its node or, for graph outputs, its output tensor; matched here by output tensor name)."""
    nncf = _nncf()
    _, layers, kept, _ = job.prepared()
    if not kept:
        return None
    by_tensor = {}
    for op in model.get_ops():
        if op.get_type_name() in ("MatMul", "Gather"):
            for name in set(op.output(0).get_names()) | {op.get_friendly_name()}:
                by_tensor.setdefault(name, op.get_friendly_name())
    names = []
    for l in layers:
        if l.node in kept:
            name = by_tensor.get(l.output) or by_tensor.get(l.node)
            if name is None:
                raise QuantizationError(f"--keep-float {kept[l.node]}: layer {l.name} is not in the OpenVINO model")
            names.append(name)
    return nncf.IgnoredScope(names=names, validate=True)


@contextlib.contextmanager
def _no_progress():
    """NNCF draws progress bars on stdout; keep the command's output to its own lines."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# --- layer report ------------------------------------------------------------------------------------------
def _weight_source(op, index: int) -> tuple[str, str]:
    """Follow a MatMul/Gather weight input up to its Constant: (constant element type, path of op types)."""
    node = op.input_value(index).get_node()
    path = []
    for _ in range(8):
        kind = node.get_type_name()
        path.append(kind)
        if kind == "Constant":
            return node.get_output_element_type(0).get_type_name(), "/".join(path)
        if kind == "FakeQuantize":
            return "fq", "/".join(path)
        if kind == "Parameter" or node.get_input_size() == 0:
            return "activation", "/".join(path)
        # dequantization chains: Convert / Subtract / Multiply / Reshape / Transpose (first input holds the data)
        node = node.input_value(0).get_node()
    return "?", "/".join(path)


def ir_status(model, layers) -> dict[str, dict]:
    """{fp32 node name: {"quantized", "as"}} for an OpenVINO model, matched by ONNX output tensor name."""
    by_tensor = {}
    for op in model.get_ops():
        if op.get_type_name() not in ("MatMul", "Gather"):
            continue
        names = set(op.output(0).get_names()) | {op.get_friendly_name()}
        for n in names:
            by_tensor[n] = op
    status = {}
    for layer in layers:
        op = by_tensor.get(layer.output) or by_tensor.get(layer.node)
        if op is None:
            status[layer.node] = {"quantized": False, "as": "folded or not found in the IR"}
            continue
        idx = 0 if layer.op == "Gather" else 1
        etype, path = _weight_source(op, idx)
        if etype in INT_TYPES or etype == "fq":
            status[layer.node] = {"quantized": True, "as": f"{op.get_type_name()} <- {path} ({etype})"}
        elif layer.kind == "activation-matmul":
            a, _ = _weight_source(op, 0)
            b, _ = _weight_source(op, 1)
            q = a == "fq" and b == "fq"
            status[layer.node] = {"quantized": q, "as": "FakeQuantize x FakeQuantize" if q else op.get_type_name()}
        else:
            status[layer.node] = {"quantized": False, "as": f"{op.get_type_name()} <- {path} ({etype})"}
    return status


def _output(job, model, files: list[Path], record: dict, notes: dict | None = None):
    from . import Output

    _, layers, kept, _ = job.prepared()
    status = ir_status(model, layers)
    report = layer_report(layers, status, kept, notes)
    record = {**record, "layers": report, "kept_float_request": sorted(set(kept.values())),
              "format": "OpenVINO IR (model.xml + model.bin)"}
    return Output(files=files, model=files[0], record=record, report_lines=format_report(report))


# --- methods -----------------------------------------------------------------------------------------------
def ir(job):
    model = _convert(job.source)
    fp16 = job.precision == "fp16"
    files = _save(model, job, fp16=fp16)
    job.prepared()
    record = {"tool": "openvino.convert_model + openvino.save_model",
              "settings": {"compress_to_fp16": fp16}}
    notes = {l.node: ("fp16 weights (compress_to_fp16)" if fp16 else "fp32 IR: no quantization")
             for l in job.prepared()[1] if l.kind in ("linear", "lm_head", "embedding")}
    return _output(job, _ov().Core().read_model(str(files[0])), files, record, notes)


def _group_problem(job, group: int) -> list[str]:
    _, layers, kept, _ = job.prepared()
    bad = []
    for l in layers:
        if l.kind in ("linear", "lm_head") and l.node not in kept and l.shape and l.shape[0] % group:
            bad.append(f"{l.name} (K={l.shape[0]})")
        if l.kind == "embedding" and l.node not in kept and l.shape and l.shape[1] % group:
            bad.append(f"{l.name} (row width {l.shape[1]})")
    return bad


def _compress(job, mode_name: str, **kw):
    nncf = _nncf()
    _, _, _, src = job.prepared()
    model = _convert(src)
    mode = getattr(nncf.CompressWeightsMode, mode_name)
    try:
        with _no_progress():
            return nncf.compress_weights(model, mode=mode, ignored_scope=_ignored(job, model), **kw)
    except QuantizationError:
        raise
    except Exception as exc:
        raise QuantizationError(f"nncf.compress_weights({mode_name}) failed: {_first(exc)}") from exc


def weights_int8(job):
    sym = job.options.value("symmetric")
    mode = "INT8_SYM" if sym else "INT8_ASYM"
    model = _compress(job, mode)
    files = _save(model, job)
    record = {"tool": "nncf.compress_weights", "settings": {"mode": mode, "per_channel": True, "data_free": True}}
    return _output(job, model, files, record)


def _int4(job, data_aware: bool):
    sym = job.options.value("symmetric")
    group = job.options.value("group_size")
    bad = _group_problem(job, group)
    if bad:
        raise QuantizationError(f"--group-size {group} does not divide the input width of {', '.join(bad)}; NNCF "
                                "cannot pad a group: choose a group size that divides every width "
                                "(or keep those layers in float with --keep-float)")
    mode = "INT4_SYM" if sym else "INT4_ASYM"
    kw = {"group_size": group, "ratio": 1.0, "all_layers": True}
    settings = {"mode": mode, "group_size": group, "ratio": 1.0, "all_layers": True, "data_free": not data_aware}
    record = {"tool": "nncf.compress_weights", "settings": settings}
    if data_aware:
        dataset, cal, n = _dataset(job)
        kw.update(dataset=dataset, awq=True, scale_estimation=True, subset_size=n)
        settings.update(awq=True, scale_estimation=True, subset_size=n)
        record["calibration"] = cal.describe()
        job.log(f"AWQ + scale estimation on {n} windows of {cal.window} tokens from {cal.source}")
    model = _compress(job, mode, **kw)
    files = _save(model, job)
    return _output(job, model, files, record)


def weights_int4(job):
    return _int4(job, data_aware=False)


def weights_int4_awq(job):
    return _int4(job, data_aware=True)


def quantize_int8(job):
    nncf = _nncf()
    _, _, _, src = job.prepared()
    model = _convert(src)
    dataset, cal, n = _dataset(job)
    job.log(f"nncf.quantize on {n} windows of {cal.window} tokens from {cal.source}")
    try:
        with _no_progress():
            q = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=n,
                              ignored_scope=_ignored(job, model))
    except Exception as exc:
        raise QuantizationError(f"nncf.quantize failed: {_first(exc)}") from exc
    files = _save(q, job)
    record = {"tool": "nncf.quantize", "settings": {"model_type": "TRANSFORMER", "preset": "default (MIXED for TRANSFORMER)",
                                                    "subset_size": n, "weights": "int8", "activations": "int8"},
              "calibration": cal.describe()}
    return _output(job, q, files, record)
