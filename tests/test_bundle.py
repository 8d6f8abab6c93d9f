"""Bundles: manifest API, atomic updates, and every kind of tampering refused with a BundleError."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit import runtime
from toolkit.bundle import MANIFEST, Bundle, file_entry, new_bundle, onnx_external_locations, write_manifest
from toolkit.errors import BundleError
from toolkit.runtime.backends import OnnxRuntimeBackend
from toolkit.targets import get as get_target

ROOT = Path(__file__).resolve().parent.parent


def _manifest(b: Path) -> dict:
    return json.loads((b / MANIFEST).read_text())


def _rehash(b: Path):
    """Recompute every file entry: a consistent manifest around a bad file (a malicious or buggy writer)."""
    m = _manifest(b)
    m["files"] = {rel: file_entry(b / rel) for rel in m["files"]}
    write_manifest(b, m)


def _rename_file(b: Path, old: str, new: str):
    m = _manifest(b)
    m["files"][new] = m["files"].pop(old)
    for v in m["variants"]:
        v["files"] = [new if f == old else f for f in v["files"]]
        v["model"] = new if v["model"] == old else v["model"]
    write_manifest(b, m)


# --- the API -------------------------------------------------------------------------------------------
def test_open_and_lookup(tiny_bundle, tiny_checkpoint):
    from toolkit.checkpoint import read_config

    b = Bundle.open(tiny_bundle)
    assert b.model_config == read_config(tiny_checkpoint)[0]
    assert b.variant("fp32").model == "fp32/model.onnx"
    assert b.variant("fp16", target="cpu").precision == "fp16"
    with pytest.raises(BundleError, match="no int8 variant"):
        b.variant("int8")
    with pytest.raises(BundleError, match="no fp32 variant for target 'nowhere'"):
        b.variant("fp32", target="nowhere")
    assert b.path_of("tokenizer.json").is_file()
    for bad in ("../x", "/etc/passwd", "a/../../b", "a\\b"):
        with pytest.raises(BundleError):
            b.path_of(bad)
    assert onnx_external_locations(b.path_of("fp32/model.onnx")) == []


def test_add_variant_and_parity(bundle_copy):
    b = Bundle.open(bundle_copy)
    (bundle_copy / "int8").mkdir()
    shutil.copyfile(bundle_copy / "fp32" / "model.onnx", bundle_copy / "int8" / "model.onnx")  # stands in for a quantized graph
    v = b.add_variant("int8", "int8", ["int8/model.onnx"], ["cpu"], "int8/model.onnx", quantization={"method": "test"})
    assert v.quantization == {"method": "test"} and v.parity is None
    b.set_parity("int8", {"verdict": "pass", "max_abs": 0.01})
    again = Bundle.open(bundle_copy)  # verifies the new file's hash too
    assert again.variant("int8", "cpu").parity == {"verdict": "pass", "max_abs": 0.01}
    assert [v.name for v in again.variants] == ["fp32", "fp16", "int8"]
    assert not [p for p in bundle_copy.iterdir() if p.name.startswith(".")]  # no temp files left
    assert runtime.load(again, precision="int8").forward([[1, 2, 3]])[0].shape[:2] == (1, 3)
    # re-adding replaces the variant rather than duplicating it
    b.add_variant("int8", "int8", ["int8/model.onnx"], ["cpu"], "int8/model.onnx")
    assert [v.name for v in Bundle.open(bundle_copy).variants].count("int8") == 1
    with pytest.raises(BundleError, match="does not exist"):
        b.add_variant("x", "int4", ["int4/model.onnx"], ["cpu"], "int4/model.onnx")
    with pytest.raises(BundleError, match="escapes"):
        b.add_variant("x", "int4", ["../model.onnx"], ["cpu"], "../model.onnx")
    with pytest.raises(BundleError, match="no variant named"):
        b.set_parity("nope", {})


def test_new_bundle_is_atomic(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(RuntimeError):
        with new_bundle(out) as tmp:
            (tmp / "x").write_text("half-written")
            raise RuntimeError("killed mid-export")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with new_bundle(out) as tmp:
        write_manifest(tmp, {"format": "v1"})
    with pytest.raises(BundleError, match="already exists"):
        with new_bundle(out):
            pass
    with new_bundle(out, overwrite=True) as tmp:
        write_manifest(tmp, {"format": "v2"})
    assert json.loads((out / MANIFEST).read_text()) == {"format": "v2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def _to_external_data(b: Path):
    """Re-save every variant's graph with its weights in an ONNX external-data file (as export does for
    models over 1.5 GB), and list the .data files in the manifest."""
    import onnx

    m = _manifest(b)
    for v in m["variants"]:
        model = onnx.load(str(b / v["model"]))
        onnx.save(model, str(b / v["model"]), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx.data", size_threshold=1024)
        data = str(Path(v["model"]).parent / "model.onnx.data")
        v["files"].append(data)
        m["files"][data] = {}
    write_manifest(b, m)
    _rehash(b)


def test_external_data_bundle(bundle_copy, tiny_bundle):
    _to_external_data(bundle_copy)
    b = Bundle.open(bundle_copy)
    for name in ("fp32", "fp16"):
        v = b.variant(name)
        assert f"{name}/model.onnx.data" in v.files
        assert onnx_external_locations(b.path_of(v.model)) == ["model.onnx.data"] * len(onnx_external_locations(b.path_of(v.model)))
    assert runtime.load(b).generate("One day", max_new_tokens=6) == runtime.load(tiny_bundle).generate("One day", max_new_tokens=6)

    # an external-data location that points outside the bundle is refused, even with consistent hashes
    import onnx

    (bundle_copy.parent / "outside.data").write_bytes((bundle_copy / "fp32" / "model.onnx.data").read_bytes())
    for evil in ("../../outside.data", "/etc/hostname", "model.onnx.missing"):
        model = onnx.load(str(bundle_copy / "fp32" / "model.onnx"), load_external_data=False)
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = evil
        onnx.save(model, str(bundle_copy / "fp32" / "model.onnx"))
        _rehash(bundle_copy)
        with pytest.raises(BundleError, match="external data"):
            Bundle.open(bundle_copy)


# --- tampering -----------------------------------------------------------------------------------------
def _flip_byte(b: Path):
    p = b / "fp32" / "model.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _missing(b: Path):
    (b / "fp16" / "model.onnx").unlink()


def _dotdot(b: Path):
    _rename_file(b, "fp16/model.onnx", "../fp16/model.onnx")


def _dotdot_inner(b: Path):
    _rename_file(b, "fp16/model.onnx", "fp16/../../escape/model.onnx")


def _absolute(b: Path):
    outside = b.parent / "outside.onnx"
    shutil.copyfile(b / "fp16" / "model.onnx", outside)
    _rename_file(b, "fp16/model.onnx", str(outside.resolve()))


def _symlink(b: Path):
    outside = b.parent / "outside-tokenizer.json"
    shutil.copyfile(b / "tokenizer.json", outside)  # same bytes, same hash: only the link gives it away
    (b / "tokenizer.json").unlink()
    os.symlink(outside, b / "tokenizer.json")


def _symlinked_dir(b: Path):
    outside = b.parent / "outside-fp16"
    shutil.move(b / "fp16", outside)
    os.symlink(outside, b / "fp16")


def _not_onnx(b: Path):
    (b / "fp32" / "model.onnx").write_text("this is not an ONNX model\n" * 20)
    _rehash(b)


def _truncated(b: Path):
    p = b / "fp32" / "model.onnx"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    _rehash(b)


def _bad_manifest_json(b: Path):
    (b / MANIFEST).write_text("{not json")


def _wrong_format(b: Path):
    m = _manifest(b)
    m["format"] = "edgekit-bundle/99"
    write_manifest(b, m)


TAMPER = {f.__name__.lstrip("_"): f for f in (_flip_byte, _missing, _dotdot, _dotdot_inner, _absolute, _symlink,
                                               _symlinked_dir, _not_onnx, _truncated, _bad_manifest_json, _wrong_format)}


@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_bundle_is_refused(case, bundle_copy):
    TAMPER[case](bundle_copy)
    with pytest.raises(BundleError) as info:
        runtime.load(bundle_copy)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["not_onnx", "truncated"])
def test_onnxruntime_load_error_is_one_line(kind, tiny_bundle, tmp_path):
    """Even past the bundle checks, ONNX Runtime's own loading error becomes a one-line BundleError."""
    path = tmp_path / "model.onnx"
    good = (tiny_bundle / "fp32" / "model.onnx").read_bytes()
    path.write_bytes(b"not an onnx model" * 10 if kind == "not_onnx" else good[: len(good) // 3])
    with pytest.raises(BundleError, match="ONNX Runtime cannot load") as info:
        OnnxRuntimeBackend().load(path, get_target("cpu"), "fp32")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["flip_byte", "symlink"])
def test_cli_reports_tampering_in_one_line(case, bundle_copy):
    TAMPER[case](bundle_copy)
    proc = subprocess.run([sys.executable, "-m", "toolkit", "generate", str(bundle_copy), "One day"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgekit generate: error:"), proc.stderr
