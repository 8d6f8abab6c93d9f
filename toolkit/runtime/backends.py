"""Inference backends: one small class per runtime behind one interface, registered in BACKENDS.

    backend = BACKENDS[target.runtime]()
    loaded = backend.load(model_path, target, precision)   # -> Loaded (input dtypes, output names)
    outputs = backend.run(loaded, feeds)                    # feeds: {input name: np.ndarray} -> {output name: np.ndarray}

Heavy imports (onnxruntime, openvino) happen inside `load`, so an optional runtime stays optional. A
target whose device or execution provider is missing raises TargetUnavailable; nothing falls back to
the CPU silently. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BundleError, TargetUnavailable
from ..targets import Target

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class Loaded:
    handle: object  # the runtime's session / compiled model
    inputs: dict[str, np.dtype]  # input name -> dtype the graph expects
    outputs: list[str]
    device: str  # what actually runs it, e.g. "CPUExecutionProvider" or "openvino:CPU"
    extra: dict = field(default_factory=dict)


class Backend:
    name = ""

    def load(self, model_path: Path, target: Target, precision: str) -> Loaded:
        raise NotImplementedError

    def run(self, loaded: Loaded, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def _install_hint(target: Target, default: str) -> str:
    return getattr(target, "install", "") or default


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime with the target's execution provider only (never a silent CPU fallback).

    target.options (all optional): provider_options (dict for the provider), session_config (dict of
    SessionOptions config entries), intra_op_num_threads (int), graph_optimization_level
    ("disable" | "basic" | "extended" | "all"). target.plugin: a Python package shipping a plugin EP
    library, registered with onnxruntime.register_execution_provider_library and selected with
    SessionOptions.add_provider_for_devices.

    Defaults chosen by measurement (BENCHMARKS.md): sequential execution (one decode step is a chain of
    small nodes; parallel node execution only adds scheduling), and on the CPU EP
    `session.intra_op.allow_spinning` = 0 — spinning worker threads waiting for the next node cost up to
    1.8x in decode speed with 2 threads on a loaded machine, and nothing measurable with 1; a target
    can turn it back on with session_config = { "session.intra_op.allow_spinning" = "1" }.
    """

    name = "onnxruntime"

    def _session_options(self, ort, target: Target, provider: str):
        opts = dict(target.options)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if "intra_op_num_threads" in opts:
            so.intra_op_num_threads = int(opts["intra_op_num_threads"])
        level = opts.get("graph_optimization_level")
        if level:
            so.graph_optimization_level = {
                "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        config = {str(k): str(v) for k, v in dict(opts.get("session_config", {})).items()}
        if provider == "CPUExecutionProvider":
            config.setdefault("session.intra_op.allow_spinning", "0")
        for key, value in config.items():
            so.add_session_config_entry(key, value)
        if provider != "CPUExecutionProvider":
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        return so, {str(k): str(v) for k, v in dict(opts.get("provider_options", {})).items()}

    def _plugin_devices(self, target: Target, provider: str):
        """Register the plugin EP library (once per process, via toolkit.probe) and return its devices."""
        from .. import probe

        ok, message = probe.register_plugin(target)
        if not ok:
            raise TargetUnavailable(f"target {target.name!r}: {message}")
        devices = probe.ep_devices(target)
        if not devices:
            raise TargetUnavailable(f"target {target.name!r}: {provider} found no device on this machine")
        return devices

    def load(self, model_path: Path, target: Target, precision: str) -> Loaded:
        import onnxruntime as ort

        provider = target.provider or "CPUExecutionProvider"
        so, provider_options = self._session_options(ort, target, provider)
        if getattr(target, "plugin", ""):
            so.add_provider_for_devices(self._plugin_devices(target, provider), provider_options)
            providers = None
        elif provider not in ort.get_available_providers():
            raise TargetUnavailable(
                f"target {target.name!r} needs ONNX Runtime's {provider}, which this installation lacks "
                f"(available: {', '.join(ort.get_available_providers())}); "
                f"{_install_hint(target, 'install the onnxruntime package that provides it')}")
        else:
            providers = [(provider, provider_options)]
        try:
            sess = ort.InferenceSession(str(model_path), so, providers=providers)
        except Exception as exc:
            kind = type(exc).__name__
            if provider == "CPUExecutionProvider" or kind in ("InvalidProtobuf", "InvalidGraph", "NoSuchFile"):
                raise BundleError(f"ONNX Runtime cannot load {model_path}: {kind}: {_first_line(exc)}") from None
            raise TargetUnavailable(f"target {target.name!r}: {provider} cannot run {model_path} "
                                    f"({kind}: {_first_line(exc)})") from None
        if provider not in sess.get_providers():
            raise TargetUnavailable(f"target {target.name!r}: ONNX Runtime did not enable {provider} "
                                    f"(session providers: {', '.join(sess.get_providers())})")
        inputs = {i.name: np.dtype(_NP_TYPES.get(i.type, np.float32)) for i in sess.get_inputs()}
        return Loaded(sess, inputs, [o.name for o in sess.get_outputs()], provider)

    def run(self, loaded: Loaded, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = loaded.handle.run(loaded.outputs, feeds)
        return dict(zip(loaded.outputs, values))


class OpenVINOBackend(Backend):
    """OpenVINO, device from target.device (CPU | GPU | NPU). target.options: compile config entries.

    INFERENCE_PRECISION_HINT (unless target.options sets it): OpenVINO's CPU plugin otherwise computes in
    bf16 on CPUs with AMX / AVX512-BF16 and drifts ~4e-2 from ONNX Runtime. fp32, int8 and int4 (weight-
    compressed) -> f32 activations on CPU and GPU;
    fp16 on CPU -> f16 where the CPU supports it, else f32 (fp16 weights, f32 arithmetic) — never bf16,
    which keeps fewer mantissa bits than the fp16 the variant promises.
    """

    name = "openvino"

    def load(self, model_path: Path, target: Target, precision: str) -> Loaded:
        try:
            import openvino as ov
        except ImportError:
            raise TargetUnavailable(f"target {target.name!r} needs OpenVINO, which is not installed: "
                                    "pip install edgekit[openvino]") from None
        device = target.device or "CPU"
        core = ov.Core()
        if not any(d == device or d.startswith(device + ".") for d in core.available_devices):
            raise TargetUnavailable(f"target {target.name!r}: OpenVINO device {device} is not available "
                                    f"(available: {', '.join(core.available_devices) or 'none'})")
        config = {str(k): str(v) for k, v in dict(target.options).items()}
        kind = device.split(".")[0]
        if precision in ("fp32", "int8", "int4") and kind in ("CPU", "GPU"):
            # int8 / int4 variants are weight-compressed: activations stay f32 (bf16 flipped 4% of top-1 on tiny)
            config.setdefault("INFERENCE_PRECISION_HINT", "f32")
        elif precision == "fp16" and kind == "CPU":  # f16 where the CPU has it; never bf16 (fewer mantissa bits)
            caps = core.get_property(device, "OPTIMIZATION_CAPABILITIES")
            config.setdefault("INFERENCE_PRECISION_HINT", "f16" if "FP16" in caps else "f32")
        try:
            model = core.read_model(str(model_path))
        except Exception as exc:
            raise BundleError(f"OpenVINO cannot read {model_path}: {_first_line(exc)}") from None
        try:
            compiled = core.compile_model(model, device, config)
        except Exception as exc:
            raise TargetUnavailable(f"target {target.name!r}: OpenVINO {device} cannot compile {model_path} "
                                    f"({_first_line(exc)})") from None
        inputs = {p.get_any_name(): np.dtype(p.get_element_type().to_dtype()) for p in compiled.inputs}
        outputs = [p.get_any_name() for p in compiled.outputs]
        return Loaded(compiled, inputs, outputs, f"openvino:{device}", {"request": compiled.create_infer_request()})

    def run(self, loaded: Loaded, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = loaded.extra["request"]
        request.infer(feeds)
        return {p.get_any_name(): np.array(request.get_tensor(p).data) for p in loaded.handle.outputs}


BACKENDS: dict[str, type[Backend]] = {
    "onnxruntime": OnnxRuntimeBackend,
    "openvino": OpenVINOBackend,
}


def get_backend(runtime: str) -> Backend:
    if runtime not in BACKENDS:
        raise TargetUnavailable(f"no backend for runtime {runtime!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[runtime]()
