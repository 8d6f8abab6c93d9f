"""Is a target usable on this machine, and if not, why? Found by probing, never assumed. Torch-free.

    usable, reason = probe.availability(targets.get("qnn-htp"))

onnxruntime targets: the onnxruntime package imports; a plugin EP's Python package imports and its library
registers (`onnxruntime.register_execution_provider_library`); the provider is in
`onnxruntime.get_available_providers()`; and a device backs it: an `OrtEpDevice` from
`onnxruntime.get_ep_devices()` for that EP, or for the CUDA provider of a build without EP devices a CUDA
driver that reports at least one GPU. openvino targets: the openvino package imports and
`openvino.Core().available_devices` lists the device. The CPU execution provider is always usable.

A probe never raises for a missing package or device: it reports it, with what to install.
"""

from __future__ import annotations

import ctypes
import importlib
from dataclasses import dataclass

from .targets import Target

_REGISTERED: dict[str, str] = {}  # provider -> library path registered in this process
DRIVERS = {  # what a missing device usually needs besides the Python package
    "CUDAExecutionProvider": "an NVIDIA GPU with its driver, CUDA 12 and cuDNN 9",
    "QNNExecutionProvider": "a Snapdragon device with Qualcomm's HTP driver",
    "openvino:GPU": "an Intel GPU with its compute runtime (intel-opencl-icd)",
    "openvino:NPU": "an Intel Core Ultra NPU with its driver (linux-npu-driver)",
}


@dataclass(frozen=True)
class Probe:
    target: str
    usable: bool
    reason: str


def _import(name: str):
    """importlib.import_module, or None when the package is missing (tests fake this with sys.modules)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
    except Exception:  # a broken install (e.g. a shared library that fails to load) is "missing" too
        return None


def _install_hint(target: Target, package: str) -> str:
    return target.install or f"pip install {package}"


def register_plugin(target: Target) -> tuple[bool, str]:
    """Register the target's plugin EP library with onnxruntime once per process: (ok, message)."""
    if target.provider in _REGISTERED:
        return True, _REGISTERED[target.provider]
    ort = _import("onnxruntime")
    plugin = _import(target.plugin)
    if ort is None:
        return False, f"onnxruntime is not installed: {_install_hint(target, 'onnxruntime')}"
    if plugin is None:
        return False, f"the {target.plugin} package is not installed: {_install_hint(target, target.plugin)}"
    if not hasattr(ort, "register_execution_provider_library"):
        return False, (f"onnxruntime {ort.__version__} cannot load plugin execution providers "
                       "(needs onnxruntime >= 1.22): pip install -U onnxruntime")
    try:
        path = plugin.get_library_path()
    except Exception as exc:
        return False, f"{target.plugin} does not name its EP library ({type(exc).__name__}: {exc})"
    try:
        ort.register_execution_provider_library(target.provider, path)
    except Exception as exc:
        if "already registered" not in str(exc).lower():
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return False, f"{target.plugin}'s EP library failed to register with onnxruntime: {first}"
    _REGISTERED[target.provider] = path
    return True, path


def ep_devices(target: Target) -> list:
    """The OrtEpDevice objects of the target's execution provider (after registering its plugin)."""
    ort = _import("onnxruntime")
    if ort is None or not hasattr(ort, "get_ep_devices"):
        return []
    if target.plugin:
        ok, _ = register_plugin(target)
        if not ok:
            return []
    try:
        return [d for d in ort.get_ep_devices() if d.ep_name == target.provider]
    except Exception:
        return []


def _device_text(dev) -> str:
    hw = dev.device
    kind = str(hw.type).rsplit(".", 1)[-1]
    return f"{kind} device ({hw.vendor or 'unknown vendor'})"


def _cuda_gpu_count() -> tuple[int, str]:
    """Number of CUDA devices the NVIDIA driver reports, and a note (driver missing, error code)."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return 0, "no NVIDIA driver (libcuda not found)"
    if lib.cuInit(0) != 0:
        return 0, "the NVIDIA driver is installed but cuInit failed (no usable GPU)"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0, "cuDeviceGetCount failed"
    return count.value, f"{count.value} CUDA device(s)"


def _probe_onnxruntime(target: Target) -> tuple[bool, str]:
    ort = _import("onnxruntime")
    if ort is None:
        return False, f"onnxruntime is not installed: {_install_hint(target, 'onnxruntime')}"
    version = getattr(ort, "__version__", "?")
    if target.provider == "CPUExecutionProvider":
        return True, f"onnxruntime {version}, host CPU"
    if target.plugin:
        ok, message = register_plugin(target)
        if not ok:
            return False, message
        devices = ep_devices(target)
        if not devices:
            return False, (f"{target.plugin} is installed but {target.provider} reports no device on this machine")
        plugin = _import(target.plugin)
        pver = getattr(plugin, "__version__", "?")
        text = _device_text(devices[0])
        note = ""
        if target.provider == "QNNExecutionProvider" and str(devices[0].device.type).endswith("CPU"):
            note = "; no Hexagon NPU here: the HTP backend runs as Qualcomm's simulator on the host CPU"
        return True, f"{target.provider} via {target.plugin} {pver} (onnxruntime {version}), {text}{note}"
    available = ort.get_available_providers()
    if target.provider not in available:
        return False, (f"onnxruntime {version} has no {target.provider} (available: {', '.join(available)}): "
                       f"{_install_hint(target, 'the matching onnxruntime build')}")
    devices = ep_devices(target)
    if devices:
        return True, f"{target.provider} (onnxruntime {version}), {_device_text(devices[0])}"
    if target.provider == "CUDAExecutionProvider":
        count, note = _cuda_gpu_count()
        if count < 1:
            return False, (f"onnxruntime {version} has {target.provider} but this machine has no CUDA GPU ({note}); "
                           f"it needs {DRIVERS['CUDAExecutionProvider']}")
        return True, f"{target.provider} (onnxruntime {version}), {note}"
    return True, f"{target.provider} (onnxruntime {version}); device not enumerable, assumed by the provider build"


def _probe_openvino(target: Target) -> tuple[bool, str]:
    ov = _import("openvino")
    if ov is None:
        return False, f"openvino is not installed: {_install_hint(target, 'openvino')}"
    version = str(getattr(ov, "__version__", "?")).split("-")[0]
    try:
        core = ov.Core()
        devices = list(core.available_devices)
    except Exception as exc:
        return False, f"OpenVINO {version} failed to start: {(str(exc).splitlines() or [''])[0]}"
    matches = [d for d in devices if d == target.device or d.startswith(target.device + ".")]
    if not matches:
        need = DRIVERS.get(target.engine)
        return False, (f"device {target.device} not present (OpenVINO {version} sees: {', '.join(devices) or 'nothing'})"
                       + (f"; it needs {need}" if need else ""))
    try:
        full = core.get_property(matches[0], "FULL_DEVICE_NAME")
    except Exception:
        full = matches[0]
    return True, f"OpenVINO {version}, {matches[0]}: {full}"


PROBES = {"onnxruntime": _probe_onnxruntime, "openvino": _probe_openvino}


def availability(target: Target) -> tuple[bool, str]:
    """(usable on this machine, why / what runs it). Never raises for a missing package or device."""
    try:
        return PROBES[target.runtime](target)
    except Exception as exc:  # a probe must report, not crash the command that asked
        return False, f"probe failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def probe_all(targets: dict[str, Target] | None = None) -> list[Probe]:
    from .targets import all_targets

    targets = all_targets() if targets is None else targets
    return [Probe(name, *availability(t)) for name, t in targets.items()]
