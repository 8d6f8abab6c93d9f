"""Quantization: add int8 / 4-bit (and OpenVINO IR) variants to a bundle, each with a record of how it was
made and which layers stayed in floating point.

    from toolkit.quantize import quantize
    summary = quantize("bundles/small", "int4")                                  # default method for cpu
    summary = quantize("bundles/small", "int8", "ort-int8-static", options=Options(calibration="valid.txt"))
    summary = quantize("bundles/small", "int4", target="openvino-cpu")            # NNCF weight compression
    summary = quantize("bundles/small", "int4", search=True, max_ppl_delta=2.0)   # smallest passing recipe

Every method is one entry of METHODS (one small module per family: ort_int8, ort_int4, openvino, qnn);
DEFAULTS names the method `--precision P` uses on each runtime when no --method is given (the one that
meets the target's quality thresholds in docs/quantization.md's measurements).

Atomicity: a variant is built in a temporary folder inside the bundle (`.tmp-quantize-PID`), loaded and
run once on its target when that target is usable here, and only then moved into place and registered
with `Bundle.add_variant` (manifest.json replaced last). Any failure removes the temporary folder and
leaves the bundle byte-identical.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QuantizationError

GROUP_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("uint8", "uint16")


@dataclass(frozen=True)
class Method:
    name: str
    precisions: tuple[str, ...]
    runtime: str  # onnxruntime | openvino
    module: str  # module of this package holding `function`
    function: str
    calibration: str  # "none" | "required" (default text when --calibration is absent) | "npu"
    options: tuple[str, ...]  # which optional flags apply: group_size, symmetric, accuracy_level, ...
    description: str

    def run(self, job: "Job") -> "Output":
        module = importlib.import_module(f"{__name__}.{self.module}")
        return getattr(module, self.function)(job)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("ort-int8-dynamic", ("int8",), "onnxruntime", "ort_int8", "dynamic", "none", (),
           "onnxruntime quantize_dynamic: int8 per-channel weights (MatMulInteger), activations quantized "
           "per call; embedding table int8"),
    Method("ort-int8-static", ("int8",), "onnxruntime", "ort_int8", "static", "required",
           ("calibration_method", "activation_type"),
           "onnxruntime quantize_static, QDQ: int8 per-channel weights, uint8/uint16 activations with "
           "calibrated ranges (MinMax / Entropy / Percentile)"),
    Method("ort-int4-rtn", ("int4",), "onnxruntime", "ort_int4", "rtn", "none",
           ("group_size", "symmetric", "accuracy_level"),
           "MatMulNBits 4-bit blocks, round-to-nearest (DefaultWeightOnlyQuantConfig); embedding "
           "GatherBlockQuantized sharing the output head's 4-bit table when tied"),
    Method("ort-int4-hqq", ("int4",), "onnxruntime", "ort_int4", "hqq", "none",
           ("group_size", "accuracy_level"),
           "MatMulNBits 4-bit blocks, Half-Quadratic Quantization (HQQWeightOnlyQuantConfig: optimised "
           "scales / float zero points); embedding 4-bit RTN (GatherBlockQuantized)"),
    Method("ort-int4-gptq", ("int4",), "onnxruntime", "ort_int4", "gptq", "required",
           ("group_size", "symmetric", "accuracy_level"),
           "MatMulNBits 4-bit blocks, GPTQ with calibration data (GPTQWeightOnlyQuantConfig); embedding "
           "4-bit RTN (GatherBlockQuantized)"),
    Method("ov-ir", ("fp32", "fp16"), "openvino", "openvino", "ir", "none", (),
           "OpenVINO IR (openvino.convert_model + save_model; fp16 = compress_to_fp16)"),
    Method("ov-int8-weights", ("int8",), "openvino", "openvino", "weights_int8", "none", ("symmetric",),
           "OpenVINO IR, NNCF compress_weights INT8 (per-channel, data-free)"),
    Method("ov-int4-weights", ("int4",), "openvino", "openvino", "weights_int4", "none",
           ("group_size", "symmetric"),
           "OpenVINO IR, NNCF compress_weights INT4 (groups, data-free; all layers incl. embedding/head)"),
    Method("ov-int4-awq", ("int4",), "openvino", "openvino", "weights_int4_awq", "required",
           ("group_size", "symmetric"),
           "OpenVINO IR, NNCF compress_weights INT4 with AWQ + scale estimation on calibration data"),
    Method("ov-int8-static", ("int8",), "openvino", "openvino", "quantize_int8", "required", (),
           "OpenVINO IR, NNCF quantize: full INT8 (weights and activations, calibrated; transformer model type)"),
    Method("qnn-qdq", ("a16w8",), "onnxruntime", "qnn", "build", "npu", (),
           "Qualcomm HTP static-shape QDQ pair (uint16 activations, uint8 weights), via toolkit.npu"),
)}

# (precision, runtime) -> the method `--precision` uses without --method (see docs/quantization.md)
DEFAULTS: dict[tuple[str, str], str] = {
    ("int8", "onnxruntime"): "ort-int8-static",
    ("int4", "onnxruntime"): "ort-int4-rtn",
    ("fp32", "openvino"): "ov-ir",
    ("fp16", "openvino"): "ov-ir",
    ("int8", "openvino"): "ov-int8-weights",
    ("int4", "openvino"): "ov-int4-weights",
    ("a16w8", "onnxruntime"): "qnn-qdq",
}
# method defaults for options the user did not give
OPTION_DEFAULTS = {"group_size": 32, "symmetric": False, "accuracy_level": 4, "calibration_method": "minmax",
                   "activation_type": "uint16"}


@dataclass
class Options:
    group_size: int | None = None
    symmetric: bool | None = None
    accuracy_level: int | None = None
    calibration: str | None = None
    calibration_method: str | None = None
    activation_type: str | None = None
    keep_float: tuple[str, ...] = ()

    def given(self) -> list[str]:
        return [k for k in ("group_size", "symmetric", "accuracy_level", "calibration_method", "activation_type")
                if getattr(self, k) is not None]

    def value(self, key: str):
        v = getattr(self, key)
        return OPTION_DEFAULTS[key] if v is None else v


@dataclass
class Job:
    """What a method function gets: the bundle, the prepared fp32 graph and a folder to write into."""

    bundle: object
    method: Method
    precision: str
    target: object
    options: Options
    work: Path  # write outputs here
    log: object = print
    _prepared: dict = field(default_factory=dict)

    @property
    def cfg(self):
        return self.bundle.model_config

    @property
    def source(self) -> Path:
        return self.bundle.path_of(fp32_variant(self.bundle).model)

    def prepared(self):
        """(ModelProto of the fp32 graph with tied output heads untied, inventory, kept {node: pattern},
        path of that graph saved in the work folder). Untying gives the head its own constant weight, so a
        head kept in float keeps an fp32 copy while the embedding table is quantized (and vice versa)."""
        if not self._prepared:
            import onnx

            from . import graph

            model = onnx.load(str(self.source))
            layers = graph.inventory(model)
            kept = graph.resolve_keep(list(self.options.keep_float), layers, self.cfg.n_layers)
            untied = graph.untie(model, layers)
            path = self.work / "prep" / "model.onnx"
            path.parent.mkdir(exist_ok=True)
            onnx.save(model, str(path))
            self._prepared = {"model": model, "layers": layers, "kept": kept, "path": path, "untied": untied}
        p = self._prepared
        return p["model"], p["layers"], p["kept"], p["path"]

    @property
    def output(self) -> Path:
        """Where an ONNX method writes its model (job.work/model.onnx)."""
        return self.work / "model.onnx"

    def exclude_nodes(self) -> list[str]:
        return sorted(self.prepared()[2])

    def calibration(self):
        if "calibration" not in self._prepared:
            from ..tokenizer import load_tokenizer
            from .calibration import load_calibration

            tok = load_tokenizer(self.bundle.tokenizer_path)
            self._prepared["calibration"] = load_calibration(self.bundle, tok, self.options.calibration, self.cfg)
        return self._prepared["calibration"]


@dataclass
class Output:
    files: list[Path]  # written under job.work
    model: Path  # the file the runtime loads
    record: dict  # the manifest's "quantization" record (method settings, layers, ...)
    report_lines: list[str] = field(default_factory=list)


# --- resolution and checks -------------------------------------------------------------------------------
def _target_for(method: Method | None, target: str | None):
    from .. import targets

    if target is not None:
        return targets.get(target)
    if method is not None and method.name == "qnn-qdq":
        return targets.get("qnn-htp")
    if method is not None and method.runtime == "openvino":
        return targets.get("openvino-cpu")
    return targets.get("cpu")


def resolve(precision: str | None, method: str | None, target: str | None, options: Options, search: bool = False):
    """(Method, precision, Target) for a request, or one QuantizationError naming what is wrong. With
    search, options are checked against every method the search may try, not just the default one."""
    from .. import targets as target_profiles

    if method is not None and method not in METHODS:
        raise QuantizationError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    m = METHODS.get(method) if method else None
    tgt = _target_for(m, target)
    if precision is None:
        if m is not None and len(m.precisions) == 1:
            precision = m.precisions[0]
        elif tgt.static_shapes and len(tgt.precisions) == 1:
            precision = tgt.precisions[0]
        else:
            raise QuantizationError("give --precision (one of " + ", ".join(tgt.precisions) + f" for target {tgt.name})")
    if precision not in target_profiles.PRECISIONS:
        raise QuantizationError(f"unknown precision {precision!r}; known: {', '.join(target_profiles.PRECISIONS)}")
    if precision not in tgt.precisions:
        raise QuantizationError(f"target {tgt.name!r} ({tgt.engine}) cannot run precision {precision!r}; it runs "
                                f"{', '.join(tgt.precisions)}")
    if tgt.static_shapes and tgt.name != "qnn-htp":
        raise QuantizationError(f"target {tgt.name!r} needs static-shape graphs: build its variant with "
                                f"`edgekit npu-build BUNDLE --target {tgt.name}`")
    if m is None:
        key = (precision, tgt.runtime)
        if tgt.name == "qnn-htp":
            m = METHODS["qnn-qdq"]
        elif key not in DEFAULTS:
            raise QuantizationError(f"no quantization method makes {precision} for {tgt.name} "
                                    f"(fp32/fp16 ONNX variants come from `edgekit export`)")
        else:
            m = METHODS[DEFAULTS[key]]
    if precision not in m.precisions:
        raise QuantizationError(f"method {m.name} makes {', '.join(m.precisions)}, not {precision}")
    if m.runtime != tgt.runtime or (m.name == "qnn-qdq") != (tgt.name == "qnn-htp"):
        raise QuantizationError(f"method {m.name} builds for {m.runtime}"
                                f"{' (qnn-htp)' if m.name == 'qnn-qdq' else ''}; target {tgt.name} runs {tgt.engine}")
    takes = set(m.options)
    if search and method is None:
        takes = {o for x in METHODS.values() if x.runtime == m.runtime and precision in x.precisions for o in x.options}
    bad = [o for o in options.given() if o not in takes]
    if bad:
        flags = ", ".join("--" + o.replace("_", "-") for o in bad)
        raise QuantizationError(f"{flags} does not apply to method {m.name} (it takes: "
                                f"{', '.join('--' + o.replace('_', '-') for o in m.options) or 'no options'})")
    if options.keep_float and m.name in ("ov-ir", "qnn-qdq"):
        raise QuantizationError(f"--keep-float does not apply to method {m.name}")
    if options.group_size is not None and options.group_size not in GROUP_SIZES:
        raise QuantizationError(f"--group-size {options.group_size} is not supported: use one of "
                                f"{', '.join(map(str, GROUP_SIZES))} (a power of two >= 16, as MatMulNBits requires)")
    if options.accuracy_level is not None and options.accuracy_level not in ACCURACY_LEVELS:
        raise QuantizationError(f"--accuracy-level must be one of {ACCURACY_LEVELS} (MatMulNBits: 0 unset, 1 fp32, "
                                "2 fp16, 3 bf16, 4 int8 activations)")
    if options.calibration_method is not None and options.calibration_method not in CALIBRATION_METHODS:
        raise QuantizationError(f"--calibration-method must be one of {', '.join(CALIBRATION_METHODS)}")
    if options.activation_type is not None and options.activation_type not in ACTIVATION_TYPES:
        raise QuantizationError(f"--activation-type must be one of {', '.join(ACTIVATION_TYPES)}")
    if options.calibration is not None and m.calibration == "none":
        raise QuantizationError(f"method {m.name} is data-free; --calibration does not apply (data-aware: "
                                f"{', '.join(k for k, v in METHODS.items() if v.calibration != 'none')})")
    return m, precision, tgt


def variant_name(precision: str, target) -> str:
    return precision if target.name == "cpu" else f"{target.name}-{precision}"


# --- the run ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """Silence the quantizers' logging and warnings (ORT logs every node it visits; NNCF prints tables)."""
    names = ["", "onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer", "nncf"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _work_dir(bundle) -> Path:
    work = bundle.root / f".tmp-quantize-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    return work


def _bytes(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths)


def fp32_variant(bundle):
    """The exported fp32 ONNX variant every method starts from."""
    for v in bundle.variants:
        if v.precision == "fp32" and v.model.endswith(".onnx"):
            return v
    raise QuantizationError(f"bundle {bundle.root} has no fp32 ONNX variant to quantize; re-export it")


def fp32_bytes(bundle) -> int:
    return bundle.variant_bytes(fp32_variant(bundle))


def smoke(model: Path, bundle, target, precision: str) -> dict:
    """Load the built model on its target and run a prefill plus one cached step (when the target is
    usable here). A model that does not load or gives non-finite logits is a QuantizationError."""
    import numpy as np

    from .. import probe
    from ..errors import ToolkitError
    from ..runtime import load_model_file

    usable, reason = probe.availability(target)
    if not usable:
        return {"status": "not run", "reason": reason}
    try:
        session = load_model_file(model, bundle.model_config, target, precision)
        ids = np.arange(1, 9, dtype=np.int64)[None] % bundle.model_config.vocab_size
        logits, past = session.forward(ids)
        logits2, _ = session.forward(ids[:, :1], past=past)
    except ToolkitError as exc:
        raise QuantizationError(f"the {precision} model does not run on {target.name}: {exc}") from None
    except Exception as exc:
        raise QuantizationError(f"the {precision} model fails on {target.name}: {type(exc).__name__}: "
                                f"{(str(exc).splitlines() or [''])[0]}") from None
    if not (np.isfinite(logits).all() and np.isfinite(logits2).all()):
        raise QuantizationError(f"the {precision} model gives non-finite logits on {target.name}")
    return {"status": "ok", "device": session.device}


def build(bundle, method: Method, precision: str, target, options: Options, work: Path, log=print) -> Output:
    """Run one method into `work` and complete its record (sizes, layers, smoke run)."""
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    job = Job(bundle, method, precision, target, options, work, log)
    with _quiet():
        out = method.run(job)
    size = _bytes(out.files)
    base = fp32_bytes(bundle)
    rec = {"method": method.name, "description": method.description, "precision": precision, "target": target.name,
           **out.record,
           "size": {"bytes": size, "fp32_bytes": base, "ratio_to_fp32": round(size / base, 4),
                    "counted": "bytes of the variant's model files vs the fp32 variant's model files (tokenizer and "
                               "manifest excluded: every variant shares them)"},
           "versions": _versions(method), "seconds": round(time.perf_counter() - t0, 2)}
    rec["smoke"] = smoke(out.model, bundle, target, precision)
    out.record = rec
    return out


def _versions(method: Method) -> dict:
    from ..sysinfo import package_versions

    return package_versions(("onnxruntime", "onnx") if method.runtime == "onnxruntime" else ("openvino", "nncf"))


def install(bundle, out: Output, work: Path, name: str, targets: list[str], precision: str):
    """Move a built variant's files into bundle/<name>/ and register it (manifest replaced last). Files of
    a variant being replaced are set aside first and put back if the registration fails."""
    folder = bundle.root / name
    created = not folder.exists()
    folder.mkdir(exist_ok=True)
    moved, aside = [], []
    try:
        for f in out.files:
            dst = folder / Path(f).name
            if dst.exists():
                os.replace(dst, work / f"old-{dst.name}")
                aside.append(dst)
            os.replace(f, dst)
            moved.append(dst)
        rels = [f"{name}/{p.name}" for p in moved]
        export = {"source_variant": "fp32", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        return bundle.add_variant(name, precision, rels, targets, f"{name}/{Path(out.model).name}",
                                  quantization=out.record, export=export)
    except BaseException:
        for dst in moved:
            dst.unlink(missing_ok=True)
        for dst in aside:
            os.replace(work / f"old-{dst.name}", dst)
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def quantize(bundle_path, precision: str | None = None, method: str | None = None, *, target: str | None = None,
             options: Options | None = None, search: bool = False, max_ppl_delta: float | None = None,
             check: bool = False, eval_text=None, windows: int = 8, decode_steps: int = 32, log=print) -> dict:
    """Quantize a bundle's fp32 variant and add the result as a variant; returns a summary dict."""
    from ..bundle import Bundle

    options = options or Options()
    bundle = Bundle.open(bundle_path)
    m, precision, tgt = resolve(precision, method, target, options, search)
    if m.name == "qnn-qdq":
        from . import qnn

        return qnn.build_variant(bundle_path, options, log)
    fp32_variant(bundle)
    if search:
        from .search import search as run_search

        return run_search(bundle, precision, tgt, options, method=method and m, max_ppl_delta=max_ppl_delta,
                          eval_text=eval_text, windows=windows, decode_steps=decode_steps, log=log)
    work = _work_dir(bundle)
    try:
        out = build(bundle, m, precision, tgt, options, work / "build", log)
        if check:
            from .measure import Evaluator

            ev = Evaluator(bundle, tgt, precision, eval_text, windows, decode_steps, log)
            q = ev.measure(out.model)
            out.record["quality"] = q
            if q["status"] != "pass":
                from ..errors import ParityFailure

                raise ParityFailure(f"{m.name} ({precision}, {out.record['size']['bytes'] / 1e6:.2f} MB) fails the "
                                    f"{tgt.name} thresholds: {q['reason']} ({quality_line(q)}); the variant was not added")
        name = variant_name(precision, tgt)
        install(bundle, out, work, name, [tgt.name], precision)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary(bundle, name, out)


def quality_line(q: dict) -> str:
    m = q["metrics"]

    def f(key, spec):
        return "n/a" if m.get(key) is None else format(m[key], spec)

    return f"ppl {f('ppl_delta_pct', '+.3f')}%, top1 {f('top1_agreement', '.4f')}, kl_mean {f('kl_mean', '.2e')}"


def summary(bundle, name: str, out: Output) -> dict:
    rec = out.record
    return {"variant": name, "precision": rec["precision"], "method": rec["method"], "target": rec["target"],
            "bytes": rec["size"]["bytes"], "ratio_to_fp32": rec["size"]["ratio_to_fp32"],
            "record": rec, "lines": out.report_lines}


__all__ = ["DEFAULTS", "METHODS", "Method", "Options", "Output", "Job", "quantize", "resolve", "build", "install"]
