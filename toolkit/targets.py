"""Target profiles: data in targets/*.toml, loaded and validated here. Torch-free (the runtime uses it).

A profile names a runtime (onnxruntime | openvino), its execution provider or device, the precisions it
supports, whether it needs static shapes, a memory budget and parity thresholds per precision:

    name = "qnn-htp"                       # must equal the file name
    runtime = "onnxruntime"                # onnxruntime | openvino
    provider = "QNNExecutionProvider"      # onnxruntime: the execution provider
    plugin = "onnxruntime_qnn"             # onnxruntime: Python module shipping a plugin EP library (optional)
    device = "NPU"                         # openvino: CPU | GPU | NPU
    precisions = ["a16w8"]                 # keys of PRECISIONS below
    static_shapes = true                   # needs fixed-shape graphs (toolkit/static_export.py)
    window = 64                            # static targets: default prefill window W (0 = derived)
    cache_len = 256                        # static targets: default KV-cache size C (0 = model context)
    memory_budget_mb = 3072                # 0 = the host's memory
    install = "pip install edgekit[npu]"   # how to get the runtime package
    description = "..."
    compute = { fp16 = "fp32" }            # precision -> what the device computes it in (default: itself)
    [options]                              # runtime-specific session / compile options (see runtime/backends.py)
    [thresholds.a16w8]                     # parity thresholds per precision (see toolkit/parity.py)

Every problem in a profile is reported at once, as one ConfigError. Whether a target is usable on this
machine is not decided here: see toolkit/probe.py (it probes, never assumes).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, TargetUnavailable

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"
RUNTIMES = ("onnxruntime", "openvino")
OPENVINO_DEVICES = ("CPU", "GPU", "NPU")


@dataclass(frozen=True)
class Precision:
    """What a precision costs in memory (used by the fit planner) and what it means."""

    weight_bits: float  # bits per quantized weight, scales excluded
    kv_bytes: int  # bytes per KV-cache element as the graph holds it
    act_bytes: int  # bytes per activation element
    group_size: int = 0  # >0: one scale (+ zero point) per group of this many weights
    description: str = ""


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision(32, 4, 4, description="float32 weights and activations"),
    "fp16": Precision(16, 2, 2, description="float16 weights, activations and KV cache"),
    "bf16": Precision(16, 2, 2, description="bfloat16 weights, activations and KV cache"),
    "int8": Precision(8, 4, 4, description="int8 weights (per-channel scales), float32 activations"),
    "int4": Precision(4, 4, 4, group_size=32, description="4-bit weights in groups of 32 with a scale each, float32 activations"),
    "a16w8": Precision(8, 2, 2, description="static QDQ: 8-bit weights, 16-bit activations and KV cache (NPU)"),
}


@dataclass(frozen=True)
class Target:
    name: str
    runtime: str  # onnxruntime | openvino
    provider: str = ""  # onnxruntime: execution provider name, e.g. CPUExecutionProvider
    device: str = ""  # openvino: CPU | GPU | NPU
    precisions: tuple[str, ...] = ("fp32",)
    static_shapes: bool = False
    memory_budget_mb: int = 0  # 0 = unlimited / host memory
    description: str = ""
    thresholds: dict = field(default_factory=dict)  # precision -> {metric: limit}
    options: dict = field(default_factory=dict)  # runtime-specific session / compile options
    plugin: str = ""  # onnxruntime: Python module that ships a plugin EP library (e.g. onnxruntime_qnn)
    install: str = ""  # pip command that provides this target's runtime package
    window: int = 0  # static targets: default prefill window (0 = derived from the model)
    cache_len: int = 0  # static targets: default KV-cache positions (0 = the model's context)
    compute: dict = field(default_factory=dict)  # precision -> what the device really computes it in

    def compute_precision(self, precision: str) -> str:
        """e.g. ONNX Runtime's x86 CPU EP runs an fp16 graph in fp32 (it inserts casts)."""
        return self.compute.get(precision, precision)

    @property
    def engine(self) -> str:
        """Human-readable 'what runs it': the EP or the OpenVINO device."""
        return self.provider if self.runtime == "onnxruntime" else f"openvino:{self.device}"


_TYPES = {"name": str, "runtime": str, "provider": str, "device": str, "precisions": list, "static_shapes": bool,
          "memory_budget_mb": int, "description": str, "thresholds": dict, "options": dict, "plugin": str,
          "install": str, "window": int, "cache_len": int, "compute": dict}


def validate(data: dict, stem: str) -> list[str]:
    """Every problem with one profile's data (empty list = valid)."""
    problems = []
    for key, value in data.items():
        if key not in _TYPES:
            problems.append(f"unknown key {key!r} (known: {', '.join(sorted(_TYPES))})")
        elif not isinstance(value, _TYPES[key]) or (_TYPES[key] is int and isinstance(value, bool)):
            problems.append(f"{key} must be {_TYPES[key].__name__} (got {value!r})")
    if data.get("name") != stem:
        problems.append(f"name must equal the file name ({stem!r})")
    runtime = data.get("runtime")
    if runtime not in RUNTIMES:
        problems.append(f"runtime must be one of {', '.join(RUNTIMES)} (got {runtime!r})")
    if runtime == "onnxruntime" and not data.get("provider"):
        problems.append("an onnxruntime target needs provider (e.g. CPUExecutionProvider)")
    if runtime == "openvino" and data.get("device") not in OPENVINO_DEVICES:
        problems.append(f"an openvino target needs device = one of {', '.join(OPENVINO_DEVICES)} (got {data.get('device')!r})")
    if data.get("plugin") and runtime != "onnxruntime":
        problems.append("plugin applies to onnxruntime targets only")
    precisions = data.get("precisions", ["fp32"])
    if isinstance(precisions, list):
        if not precisions:
            problems.append("precisions must not be empty")
        for p in precisions:
            if p not in PRECISIONS:
                problems.append(f"unknown precision {p!r} (known: {', '.join(PRECISIONS)})")
    for prec, actual in (data.get("compute") or {}).items() if isinstance(data.get("compute"), dict) else ():
        if prec not in PRECISIONS or actual not in PRECISIONS:
            problems.append(f"compute.{prec} = {actual!r}: both must be known precisions ({', '.join(PRECISIONS)})")
    for key in ("memory_budget_mb", "window", "cache_len"):
        if isinstance(data.get(key), int) and data[key] < 0:
            problems.append(f"{key} must be >= 0 (got {data[key]})")
    if isinstance(data.get("window"), int) and isinstance(data.get("cache_len"), int) and data["cache_len"] \
            and data["window"] >= data["cache_len"]:
        problems.append(f"window ({data['window']}) must be smaller than cache_len ({data['cache_len']})")
    thresholds = data.get("thresholds", {})
    if isinstance(thresholds, dict) and isinstance(precisions, list):
        for prec, table in thresholds.items():
            if prec not in precisions:
                problems.append(f"[thresholds.{prec}]: {prec!r} is not one of this target's precisions")
            if not isinstance(table, dict):
                problems.append(f"thresholds.{prec} must be a table")
                continue
            for metric, limit in table.items():
                if isinstance(limit, bool) or not isinstance(limit, (int, float)):
                    problems.append(f"thresholds.{prec}.{metric} must be a number (got {limit!r})")
    return problems


def _parse(path: Path) -> Target:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    problems = validate(data, path.stem)
    if problems:
        raise ConfigError(f"target profile {path}: {len(problems)} problem(s): " + "; ".join(problems))
    data["precisions"] = tuple(data.get("precisions", ("fp32",)))
    return Target(**data)


def all_targets(directory: Path = TARGETS_DIR) -> dict[str, Target]:
    return {p.stem: _parse(p) for p in sorted(Path(directory).glob("*.toml"))}


def get(name: str) -> Target:
    targets = all_targets()
    if name not in targets:
        raise TargetUnavailable(f"unknown target {name!r}; known targets: {', '.join(targets)}")
    return targets[name]
