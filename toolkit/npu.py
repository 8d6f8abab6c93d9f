"""NPU variants: static graph pairs, QDQ-quantized for Qualcomm's HTP, added to a bundle.

    build_qnn_variant("bundles/tiny", calibration="data/calib.txt")   # -> the bundle's "qnn-htp" variant

1. The static prefill / decode pair is exported from the bundle's source checkpoint (its sha256 must
   match the manifest, so the variant computes what the bundle's fp32 graph computes); see
   toolkit/static_export.py.
2. Calibration: a text corpus (default: the embedded stories) is tokenized and cut into windows. Prefill
   samples are windows of random lengths 1..W (right-padded); decode samples are teacher-forced steps
   over those windows run with the float pair (ONNX Runtime CPU), so the cache inputs the quantizer sees
   are real caches at positions spread over the whole cache.
3. QDQ static quantization for QNN: `qnn_preprocess_model`, then
   `get_qnn_qdq_config(activation_type=QUInt16, weight_type=QUInt8)` and `quantize` — 16-bit activations,
   8-bit weights (per tensor: QNN's MatMul has no per-channel weights, and these graphs hold no Conv/Gemm,
   the ops where QNN takes per-channel weights).
4. When the qnn-htp target is usable here, both graphs are loaded on it (CPU fallback disabled, every
   node checked to be on QNNExecutionProvider) and their top-1 agreement with the float pair is recorded.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from .errors import BundleError, QuantizationError

VARIANT = "qnn-htp"
PRECISION = "a16w8"


# --- calibration -----------------------------------------------------------------------------------------
def calibration_ids(tok, calibration: str | Path | None, min_tokens: int) -> np.ndarray:
    """Token ids of the calibration corpus (documents separated by <|eos|>)."""
    from .corpus import default_corpus
    from .data import load_documents, tokenize_documents
    from .tokenizer import EOS

    docs = load_documents(calibration) if calibration is not None else default_corpus(400, seed=7)
    eos = tok.token_to_id(EOS)
    ids = tokenize_documents(tok, docs, eos if eos is not None else 0)
    if len(ids) < min_tokens:
        raise QuantizationError(f"the calibration text is {len(ids)} tokens; at least {min_tokens} are needed "
                                f"(give a longer --calibration file)")
    return ids


def calibration_feeds(paths: dict, cfg, shape, ids: np.ndarray, n_prefill: int = 24, n_decode: int = 96,
                      seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(prefill feeds, decode feeds) for the quantizer, made with the float static pair on the CPU."""
    import onnxruntime as ort

    W, C, L = shape.window, shape.cache, cfg.n_layers
    rng = np.random.default_rng(seed)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    pre = ort.InferenceSession(str(paths["prefill"]), so, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(paths["decode"]), so, providers=["CPUExecutionProvider"])
    span = min(C, cfg.context_len)
    prefill_feeds, decode_feeds = [], []
    per_window = max(1, -(-n_decode // n_prefill))
    for s in range(n_prefill):
        start = int(rng.integers(0, max(1, len(ids) - span)))
        seq = ids[start:start + span]
        n = W if s % 4 == 0 else int(rng.integers(1, W + 1))  # a quarter full windows, the rest shorter prompts
        n = min(n, len(seq) - 1)
        x, pos, mask = (np.zeros((1, W), np.int64) for _ in range(3))
        x[0, :n], pos[0, :n], mask[0, :n] = seq[:n], np.arange(n), 1
        feed = {"input_ids": x, "position_ids": pos, "attention_mask": mask}
        prefill_feeds.append(feed)
        cache = [np.array(o) for o in pre.run(None, feed)[1:]]
        cmask = np.zeros((1, C + 1), np.int64)
        cmask[0, :n], cmask[0, C] = 1, 1
        last = min(len(seq), C)
        record = set(rng.choice(np.arange(n, last), size=min(per_window, last - n), replace=False).tolist()) if last > n else set()
        top = max(record) if record else n - 1
        for p in range(n, top + 1):
            f = {"input_ids": seq[p:p + 1][None].astype(np.int64), "position_ids": np.array([[p]], np.int64),
                 "attention_mask": cmask.copy()}
            for i in range(L):
                f[f"past_key_values.{i}.key"], f[f"past_key_values.{i}.value"] = cache[2 * i], cache[2 * i + 1]
            if p in record:
                decode_feeds.append({k: np.array(v) for k, v in f.items()})
            o = dec.run(None, f)
            for i in range(L):
                cache[2 * i][:, :, p:p + 1], cache[2 * i + 1][:, :, p:p + 1] = o[1 + 2 * i], o[2 + 2 * i]
            cmask[0, p] = 1
    return prefill_feeds, decode_feeds


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self._it = feeds, iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)


MASK_MARGIN = 30.0  # masked attention scores are clipped to (lowest real score - this): exp(-30) ~ 1e-13


def softmax_input_ranges(model_path: Path, feeds: list[dict]) -> dict:
    """TensorQuantOverrides for every Softmax input: rmin = the lowest *unmasked* score seen in
    calibration minus MASK_MARGIN, rmax = the highest. Without this the masked positions (MASK_VALUE =
    -1e4) stretch the 16-bit range so far that a real score is only known to ~0.15; with it, masked scores
    clip to rmin, where exp() is still ~0, and real scores keep ~1e-3 resolution."""
    import onnx
    import onnxruntime as ort

    from .model import MASK_VALUE

    model = onnx.load(str(model_path))
    names = [n.input[0] for n in model.graph.node if n.op_type == "Softmax"]
    if not names:
        return {}
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the tensors by name
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    for feed in feeds:
        for name, value in zip(names, sess.run(names, feed)):
            real = value[value > MASK_VALUE / 2]
            if real.size:
                lo[name], hi[name] = min(lo[name], float(real.min())), max(hi[name], float(real.max()))
    return {n: [{"rmin": np.float32(lo[n] - MASK_MARGIN), "rmax": np.float32(max(hi[n], 0.0))}]
            for n in names if np.isfinite(lo[n])}


def quantize_qdq(src: Path, dst: Path, feeds: list[dict], work: Path) -> dict:
    """QNN-compatible QDQ quantization of one graph: uint16 activations, uint8 weights."""
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    class Reader(_Reader, CalibrationDataReader):
        pass

    pre = work / f"{src.stem}.pre.onnx"
    model = pre if qnn_preprocess_model(str(src), str(pre)) else src
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer warns about pre-processing it does not need here
    try:
        overrides = softmax_input_ranges(model, feeds)
        config = get_qnn_qdq_config(str(model), Reader(feeds), activation_type=QuantType.QUInt16,
                                    weight_type=QuantType.QUInt8, init_overrides=overrides or None)
        quantize(str(model), str(dst), config)
    except Exception as exc:
        raise QuantizationError(f"QDQ quantization of {src.name} failed: {type(exc).__name__}: "
                                f"{(str(exc).splitlines() or [''])[0]}") from exc
    finally:
        root.setLevel(level)
    return {"activations": "uint16", "weights": "uint8 per tensor (1-D scales: uint16)", "calibration": "MinMax",
            "samples": len(feeds), "softmax_input_ranges": {k: [float(v[0]["rmin"]), float(v[0]["rmax"])]
                                                            for k, v in overrides.items()}}


# --- agreement ---------------------------------------------------------------------------------------------
def top1_agreement(run_a, run_b, feeds: list[dict], prefill: bool) -> tuple[float, float]:
    """(top-1 agreement, max |logits diff|) of two graph runners over feeds (real positions only)."""
    agree = total = 0
    worst = 0.0
    for f in feeds:
        a, b = np.asarray(run_a(f)["logits"], np.float32)[0], np.asarray(run_b(f)["logits"], np.float32)[0]
        if prefill:
            keep = f["attention_mask"][0].astype(bool)
            a, b = a[keep], b[keep]
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        worst = max(worst, float(np.abs(a - b).max()))
    return agree / max(total, 1), worst


def reference_agreement(session, model, ids: np.ndarray, n_windows: int = 8, seed: int = 1) -> dict:
    """Top-1 agreement of a StaticSession's logits with the PyTorch model (teacher forcing): each sample
    is a prompt of up to W tokens through prefill, then decode steps to the end of a span."""
    import torch

    rng = np.random.default_rng(seed)
    span = min(session.cache_len, model.cfg.context_len, session.window + 32)
    agree = total = 0
    worst = 0.0
    for _ in range(n_windows):
        start = int(rng.integers(0, max(1, len(ids) - span)))
        seq = ids[start:start + span]
        with torch.no_grad():
            ref = model(torch.from_numpy(np.asarray(seq, np.int64)[None])).logits[0].numpy()
        cand, _ = session.forward(np.asarray(seq, np.int64)[None])
        cand = cand[0]
        agree += int((cand.argmax(-1) == ref.argmax(-1)).sum())
        total += len(seq)
        worst = max(worst, float(np.abs(cand - ref).max()))
    return {"top1_agreement": agree / total, "max_abs": worst, "positions": total}


# --- the bundle variant ------------------------------------------------------------------------------------
def _source_model(bundle, checkpoint):
    """The PyTorch model and tokenizer the bundle was exported from (sha256-checked)."""
    from .bundle import sha256_file
    from .sources import load_reference

    source = bundle.manifest.get("source") or {}
    path = checkpoint or source.get("checkpoint")
    if not path or not Path(path).exists():
        raise BundleError(f"bundle {bundle.root} was exported from {path or 'an unrecorded checkpoint'}, which is "
                          "not here; pass --checkpoint with the checkpoint it was exported from")
    model, tok = load_reference(path)
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        from . import checkpoint as ckpt_mod

        try:
            weights = ckpt_mod.resolve(path) / "model.safetensors"
        except Exception:
            pass
    want = source.get("sha256")
    if want and weights.is_file() and sha256_file(weights) != want:
        raise BundleError(f"{path} is not the checkpoint bundle {bundle.root} was exported from (model.safetensors "
                          "sha256 differs from the manifest); pass the right --checkpoint or re-export the bundle")
    if model.cfg.__dict__ != bundle.model_config.__dict__:
        raise BundleError(f"{path}: model config differs from bundle {bundle.root}'s manifest")
    return model, tok


def build_qnn_variant(bundle_path: str | Path, calibration: str | Path | None = None, window: int = 0,
                      cache: int = 0, checkpoint: str | Path | None = None, check: bool = True,
                      samples: tuple[int, int] = (24, 96), log=print) -> dict:
    """Build the static QDQ pair for qnn-htp into the bundle and register it as variant "qnn-htp"
    (precision a16w8). window / cache: 0 = the qnn-htp profile's defaults, capped by the model context;
    samples: (prefill windows, decode steps) for calibration.
    Returns a summary: files, shape, quantization settings, and (when the target is usable here) the
    top-1 agreement of the NPU graphs with the float pair and with PyTorch."""
    from . import probe, targets
    from .bundle import Bundle
    from .static_export import check_against_torch, default_shape, export_static

    t0 = time.perf_counter()
    bundle = Bundle.open(bundle_path)
    target = targets.get(VARIANT)
    model, tok = _source_model(bundle, checkpoint)
    ctx = model.cfg.context_len
    cache = cache or min(target.cache_len or ctx, ctx)
    window = window or min(target.window or cache // 4, cache - 1)
    shape = default_shape(ctx, window, cache)
    folder = bundle.root / VARIANT
    work = bundle.root / f".tmp-{VARIANT}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "float").mkdir(parents=True)
    try:
        log(f"exporting static pair: window {shape.window}, cache {shape.cache}")
        paths = export_static(model, work / "float", shape)
        float_err = check_against_torch(model, paths, shape)
        if not float_err <= 1e-3:
            raise QuantizationError(f"the float static pair disagrees with PyTorch (max |diff| {float_err:.3g})")
        ids = calibration_ids(tok, calibration, min_tokens=min(shape.cache, ctx) + 1)
        pre_feeds, dec_feeds = calibration_feeds(paths, model.cfg, shape, ids, *samples)
        log(f"calibrating on {len(pre_feeds)} prefill windows and {len(dec_feeds)} decode steps; quantizing (QDQ)")
        qinfo = {"format": "QDQ", "tool": "onnxruntime.quantization (get_qnn_qdq_config)",
                 "calibration_source": str(calibration) if calibration else "embedded corpus"}
        qinfo["prefill"] = quantize_qdq(paths["prefill"], work / "prefill.onnx", pre_feeds, work / "float")
        qinfo["decode"] = quantize_qdq(paths["decode"], work / "decode.onnx", dec_feeds, work / "float")
        summary = {"variant": VARIANT, "precision": PRECISION, "window": shape.window, "cache": shape.cache,
                   "float_pair_max_abs_vs_torch": float_err}
        usable, reason = probe.availability(target)
        if check and usable:
            from .runtime.static import Graph

            for name, feeds in (("prefill", pre_feeds[:6]), ("decode", dec_feeds[:12])):
                npu = Graph(work / f"{name}.onnx", target, PRECISION)  # raises if any node is off the NPU
                ref = Graph(paths[name], targets.get("cpu"), "fp32")
                agree, worst = top1_agreement(npu.run, ref.run, feeds, name == "prefill")
                summary[f"{name}_top1_vs_float"] = agree
                summary[f"{name}_max_abs_vs_float"] = worst
            qinfo["check"] = {k: v for k, v in summary.items() if k.endswith("_vs_float")}
            qinfo["check"]["device"] = reason
        elif check:
            summary["check"] = f"not run: {reason}"
        # move the graphs into place, then register them (the manifest is replaced last)
        folder.mkdir(exist_ok=True)
        for name in ("prefill", "decode"):
            os.replace(work / f"{name}.onnx", folder / f"{name}.onnx")
        files = [f"{VARIANT}/prefill.onnx", f"{VARIANT}/decode.onnx"]
        export = {"static": True, "window": shape.window, "cache": shape.cache, "prefill": files[0],
                  "decode": files[1], "padding": ["right", "left"], "rewrites": paths["rewrites"],
                  "exporter": "torch.onnx.export(dynamo=True), static shapes", "opset": 21,
                  "float_check_max_abs": float_err, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        bundle.add_variant(VARIANT, PRECISION, files, [VARIANT], files[0], quantization=qinfo, export=export)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary["files"] = files
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


# --- Intel NPU (OpenVINO) ----------------------------------------------------------------------------------
FP16_MAX = 65504.0


def openvino_npu_preflight(model_paths: list[str | Path]) -> dict:
    """Pre-flight checks of static graphs for OpenVINO's NPU plugin, without needing the device:
    - static shapes: every graph input / output dimension fixed, no inf/nan constants;
    - precision: the NPU computes in fp16, so every float constant must fit fp16 (|x| <= 65504), and
      no bf16 / float64 tensors;
    - operators: with OpenVINO installed the graph must convert (read_model); with the NPU present,
      `Core.query_model(model, "NPU")` must place every operation on it.
    Returns {"device": (usable, reason), "problems": [...], "checks": {...}}."""
    import onnx
    from onnx import TensorProto, numpy_helper

    from . import probe, targets
    from .static_export import static_problems

    target = targets.get("openvino-npu")
    usable, reason = probe.availability(target)
    problems, checks = [], {}
    for path in map(Path, model_paths):
        graph = onnx.load(str(path))
        problems += [f"{path.name}: {p}" for p in static_problems(graph)]
        biggest = 0.0
        for t in graph.graph.initializer:
            if t.data_type in (TensorProto.BFLOAT16, TensorProto.DOUBLE):
                problems.append(f"{path.name}: {t.name} is {TensorProto.DataType.Name(t.data_type)}; the NPU takes fp32/fp16/int8/int4")
            elif t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
                arr = numpy_helper.to_array(t)
                if arr.size:
                    biggest = max(biggest, float(np.abs(arr).max()))
        if biggest > FP16_MAX:
            problems.append(f"{path.name}: a constant of magnitude {biggest:.3g} overflows fp16, the NPU's compute type")
        checks[path.name] = {"static_shapes": not static_problems(graph), "max_abs_constant": biggest,
                             "ops": sorted({n.op_type for n in graph.graph.node})}
        ov = probe._import("openvino")
        if ov is None:
            checks[path.name]["operators"] = "not checked: openvino is not installed (pip install edgekit[openvino])"
            continue
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as exc:
            problems.append(f"{path.name}: OpenVINO cannot convert it: {(str(exc).splitlines() or [''])[0]}")
            continue
        if usable:
            supported = core.query_model(model, "NPU")
            missing = sorted({op.get_type_name() for op in model.get_ops() if op.get_friendly_name() not in supported})
            if missing:
                problems.append(f"{path.name}: operations the NPU plugin does not support: {', '.join(missing)}")
            checks[path.name]["operators"] = "query_model: all on NPU" if not missing else f"unsupported: {missing}"
        else:
            checks[path.name]["operators"] = f"converted by OpenVINO; NPU support not queried ({reason})"
    return {"device": {"usable": usable, "reason": reason}, "problems": problems, "checks": checks}


def build_openvino_npu_variant(bundle_path: str | Path, window: int = 0, cache: int = 0,
                               checkpoint: str | Path | None = None, log=print) -> dict:
    """The float static pair as variant "openvino-npu" (precision fp16: the NPU plugin computes in fp16),
    after the pre-flight checks. Raises ExportError when a check fails; builds even without the device
    (the summary says it is not present)."""
    from . import targets
    from .bundle import Bundle
    from .errors import ExportError
    from .static_export import check_against_torch, default_shape, export_static

    name = "openvino-npu"
    bundle = Bundle.open(bundle_path)
    target = targets.get(name)
    model, _ = _source_model(bundle, checkpoint)
    ctx = model.cfg.context_len
    cache = cache or min(target.cache_len or ctx, ctx)
    shape = default_shape(ctx, window or min(target.window or cache // 4, cache - 1), cache)
    work = bundle.root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        log(f"exporting static pair: window {shape.window}, cache {shape.cache}")
        paths = export_static(model, work, shape)
        err = check_against_torch(model, paths, shape)
        pre = openvino_npu_preflight([paths["prefill"], paths["decode"]])
        if pre["problems"]:
            raise ExportError("openvino-npu pre-flight failed: " + "; ".join(pre["problems"]))
        (bundle.root / name).mkdir(exist_ok=True)
        files = [f"{name}/prefill.onnx", f"{name}/decode.onnx"]
        for f in ("prefill", "decode"):
            os.replace(paths[f], bundle.root / name / f"{f}.onnx")
        export = {"static": True, "window": shape.window, "cache": shape.cache, "prefill": files[0], "decode": files[1],
                  "padding": ["right", "left"], "opset": 21, "float_check_max_abs": err, "graph_dtype": "float32",
                  "compute": "fp16 (OpenVINO NPU plugin)", "preflight": pre["checks"]}
        bundle.add_variant(name, "fp16", files, [name], files[0], export=export)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"variant": name, "precision": "fp16", "window": shape.window, "cache": shape.cache, "files": files,
            "float_pair_max_abs_vs_torch": err, "device": pre["device"]}
