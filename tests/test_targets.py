"""Target profiles and availability probing: profiles load and validate, probes report missing packages and
devices without crashing, and a missing CUDA provider is a TargetUnavailable, never a silent CPU run."""

import json
import sys
import types

import pytest

from toolkit import probe, targets
from toolkit.errors import ConfigError, TargetUnavailable

EXPECTED = {"cpu", "gpu", "openvino-cpu", "openvino-gpu", "openvino-npu", "qnn-htp"}


def test_every_profile_loads_and_is_consistent():
    profiles = targets.all_targets()
    assert EXPECTED <= set(profiles)
    for name, t in profiles.items():
        assert t.name == name and t.runtime in targets.RUNTIMES
        assert t.precisions and set(t.precisions) <= set(targets.PRECISIONS)
        assert set(t.thresholds) <= set(t.precisions), name
        if t.runtime == "onnxruntime":
            assert t.provider
        else:
            assert t.device in targets.OPENVINO_DEVICES
    assert profiles["gpu"].provider == "CUDAExecutionProvider"
    assert {"fp32", "fp16", "int4"} <= set(profiles["gpu"].precisions)
    qnn = profiles["qnn-htp"]
    assert qnn.static_shapes and qnn.plugin == "onnxruntime_qnn" and qnn.precisions == ("a16w8",)
    assert qnn.options["provider_options"]["backend_type"] == "htp"
    assert profiles["openvino-npu"].static_shapes and profiles["openvino-npu"].device == "NPU"
    assert targets.get("cpu").compute_precision("fp16") == "fp32"


def test_bad_profile_reports_every_problem(tmp_path):
    (tmp_path / "broken.toml").write_text(
        'name = "other"\nruntime = "tensorrt"\nprecisions = ["fp32", "fp8"]\nmemory_budget_mb = -1\n'
        'colour = "blue"\nstatic_shapes = "yes"\n[thresholds.int8]\ntop1_agreement_min = 0.9\n')
    with pytest.raises(ConfigError) as err:
        targets.all_targets(tmp_path)
    text = str(err.value)
    for needle in ("name must equal", "runtime must be one of", "unknown precision 'fp8'", "memory_budget_mb must be >= 0",
                   "unknown key 'colour'", "static_shapes must be bool", "[thresholds.int8]"):
        assert needle in text, needle


@pytest.mark.parametrize("body, needle", [
    ('name = "x"\nruntime = "onnxruntime"\n', "needs provider"),
    ('name = "x"\nruntime = "openvino"\ndevice = "TPU"\n', "needs device"),
    ('name = "x"\nruntime = "onnxruntime"\nprovider = "CPUExecutionProvider"\n[thresholds]\nfp32 = 3\n', "must be a table"),
    ('name = "x"\nruntime = "onnxruntime"\nprovider = "A"\nwindow = 64\ncache_len = 32\n', "smaller than cache_len"),
    ('name = "x"\nruntime = "onnxruntime"\nprovider = "A"\ncompute = { fp16 = "fp12" }\n', "compute.fp16"),
    ('name = "x"\nruntime = [1\n', "not valid TOML"),
])
def test_bad_profile_cases(tmp_path, body, needle):
    (tmp_path / "x.toml").write_text(body)
    with pytest.raises(ConfigError, match=None) as err:
        targets.all_targets(tmp_path)
    assert needle in str(err.value)


def test_unknown_target():
    with pytest.raises(TargetUnavailable, match="known targets"):
        targets.get("tpu")


def test_cpu_is_usable():
    usable, reason = probe.availability(targets.get("cpu"))
    assert usable and "onnxruntime" in reason


def test_missing_packages_are_reported_not_raised(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)
    monkeypatch.setattr(probe, "_REGISTERED", {})
    for name in ("openvino-cpu", "openvino-gpu", "openvino-npu"):
        usable, reason = probe.availability(targets.get(name))
        assert not usable and "not installed" in reason and "pip install edgekit[openvino]" in reason
    usable, reason = probe.availability(targets.get("qnn-htp"))
    assert not usable and "onnxruntime_qnn" in reason and "pip install edgekit[npu]" in reason


def test_missing_onnxruntime(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setattr(probe, "_REGISTERED", {})
    for name in ("cpu", "gpu", "qnn-htp"):
        usable, reason = probe.availability(targets.get(name))
        assert not usable and "onnxruntime is not installed" in reason


def _fake_openvino(devices):
    class Core:
        available_devices = devices

        def get_property(self, device, key):
            return f"fake {device}"

    return types.SimpleNamespace(__version__="2099.1.0-fake", Core=Core)


def test_openvino_device_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", _fake_openvino(["CPU", "GPU.0"]))
    assert probe.availability(targets.get("openvino-cpu")) == (True, "OpenVINO 2099.1.0, CPU: fake CPU")
    assert probe.availability(targets.get("openvino-gpu"))[0]  # GPU.0 counts as GPU
    usable, reason = probe.availability(targets.get("openvino-npu"))
    assert not usable and "device NPU not present" in reason and "sees: CPU, GPU.0" in reason


def test_probe_never_crashes(monkeypatch):
    class Broken:
        @property
        def available_devices(self):
            raise RuntimeError("driver exploded")

    monkeypatch.setitem(sys.modules, "openvino", types.SimpleNamespace(__version__="1", Core=Broken))
    usable, reason = probe.availability(targets.get("openvino-npu"))
    assert not usable and "driver exploded" in reason


def test_cuda_listed_but_no_gpu(monkeypatch):
    """A CUDA-enabled onnxruntime on a machine without a GPU is reported, not assumed usable."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(probe, "_cuda_gpu_count", lambda: (0, "no NVIDIA driver (libcuda not found)"))
    usable, reason = probe.availability(targets.get("gpu"))
    assert not usable and "no CUDA GPU" in reason and "libcuda" in reason


@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="this machine has the CUDA provider")
def test_gpu_target_raises_instead_of_running_on_cpu(tiny_bundle, monkeypatch):
    from toolkit import runtime

    with pytest.raises(TargetUnavailable, match="CUDAExecutionProvider"):
        runtime.load(tiny_bundle, target="gpu", precision="fp32")
    # even when the provider is (wrongly) listed, onnxruntime's silent CPU fallback is caught
    import onnxruntime

    real = onnxruntime.get_available_providers
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider"] + real())
    with pytest.raises(TargetUnavailable):
        runtime.load(tiny_bundle, target="gpu", precision="fp32")


def test_targets_cli(capsys):
    from toolkit.cli import main

    assert main(["targets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert EXPECTED <= set(rows)
    assert rows["cpu"]["usable"] is True
    for r in rows.values():
        assert isinstance(r["usable"], bool) and r["reason"]
    assert main(["targets"]) == 0
    table = capsys.readouterr().out
    assert "qnn-htp" in table and "usable here" in table
