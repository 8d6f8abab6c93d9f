"""Target profiles: data in targets/*.toml, loaded and validated here. Torch-free (the runtime uses it).

A profile names a runtime (onnxruntime | openvino), its execution provider or device, the precisions it
supports, whether it needs static shapes, a memory budget and parity thresholds per precision.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, TargetUnavailable

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"
RUNTIMES = ("onnxruntime", "openvino")


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


def _parse(path: Path) -> Target:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    problems = []
    known = set(Target.__dataclass_fields__)
    for key in data:
        if key not in known:
            problems.append(f"unknown key {key!r}")
    if data.get("runtime") not in RUNTIMES:
        problems.append(f"runtime must be one of {', '.join(RUNTIMES)}")
    if data.get("name") != path.stem:
        problems.append(f"name must equal the file name ({path.stem!r})")
    if problems:
        raise ConfigError(f"target profile {path}: " + "; ".join(problems))
    data["precisions"] = tuple(data.get("precisions", ("fp32",)))
    return Target(**data)


def all_targets(directory: Path = TARGETS_DIR) -> dict[str, Target]:
    return {p.stem: _parse(p) for p in sorted(directory.glob("*.toml"))}


def get(name: str) -> Target:
    targets = all_targets()
    if name not in targets:
        raise TargetUnavailable(f"unknown target {name!r}; known targets: {', '.join(targets)}")
    return targets[name]
