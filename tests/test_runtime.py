"""The torch-free runtime: sessions, generation parity with PyTorch, targets, backends and the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from toolkit import runtime
from toolkit.errors import BundleError, DataError, TargetUnavailable
from toolkit.targets import RUNTIMES, Target

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, timeout=180):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_runtime_never_imports_torch(tiny_bundle):
    code = textwrap.dedent(f"""
        import sys
        from toolkit import runtime
        s = runtime.load({str(tiny_bundle)!r}, target="cpu", precision="fp32")
        text = s.generate("One day, Tom", max_new_tokens=8)
        s16 = runtime.load({str(tiny_bundle)!r}, precision="fp16")
        s16.generate("One day", max_new_tokens=2)
        heavy = [m for m in ("torch", "toolkit.model", "toolkit.checkpoint", "toolkit.sources", "toolkit.export", "onnx")
                 if m in sys.modules]
        print("HEAVY", heavy, len(text) >= 0)
    """)
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY [] True" in proc.stdout


def test_greedy_generation_matches_pytorch(tiny_bundle, tiny_checkpoint):
    from toolkit.sources import generate_text

    session = runtime.load(tiny_bundle)
    ctx = session.config.context_len
    long = "Anna"
    while len(session.tokenizer.encode(long + " Anna").ids) < ctx - 6:
        long += " Anna"
    for prompt, n in (("One day, Tom went to the park", 24), (long, 64)):  # the second one fills the context
        ours = session.generate(prompt, max_new_tokens=n)
        ref = "".join(generate_text(tiny_checkpoint, prompt, max_new_tokens=n))
        assert ours == ref
    prompt_ids = session.tokenizer.encode(long).ids
    new = list(session.generate_ids(prompt_ids, max_new_tokens=64))
    assert len(prompt_ids) + len(new) <= ctx


def test_stream_sampling_and_seeds(tiny_bundle):
    session = runtime.load(tiny_bundle)
    pieces = list(session.stream("Lily found", max_new_tokens=12))
    assert "".join(pieces) == session.generate("Lily found", max_new_tokens=12)
    a = session.generate("Lily found", max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    b = session.generate("Lily found", max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert a == b
    assert session.generate("Lily found", max_new_tokens=0) == ""


def test_stops_at_eos(tiny_bundle, monkeypatch):
    session = runtime.load(tiny_bundle)
    eos = session.eos_id
    real = session.forward

    def forward(*args, **kwargs):  # <|eos|> becomes the argmax once two new tokens are in the cache
        logits, present = real(*args, **kwargs)
        if present[0][0].shape[2] >= len(session.tokenizer.encode("One day").ids) + 2:
            logits = logits.copy()
            logits[..., eos] = 1e4
        return logits, present

    monkeypatch.setattr(session, "forward", forward)
    assert len(list(session.generate_ids(session.tokenizer.encode("One day").ids, max_new_tokens=20))) == 2


def test_prompt_checks(tiny_bundle):
    from toolkit.sources import check_prompt as torch_side_check

    session = runtime.load(tiny_bundle)
    with pytest.raises(DataError, match="context window"):
        session.stream("word " * 200)  # refused when called, not when iterated
    with pytest.raises(DataError, match="empty"):
        session.generate("")
    with pytest.raises(DataError, match="context window"):
        torch_side_check(session.config, session.tokenizer, "word " * 200)
    with pytest.raises(DataError, match="context window"):
        session.forward(np.zeros((1, session.config.context_len + 1), np.int64))


def test_forward_batch_with_padding(tiny_bundle):
    session = runtime.load(tiny_bundle)
    ids = np.array([[5, 6, 7, 8], [0, 0, 7, 8]])
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    logits, present = session.forward(ids, attention_mask=mask)
    assert logits.shape == (2, 4, session.config.vocab_size) and logits.dtype == np.float32
    assert len(present) == session.config.n_layers
    assert present[0][0].shape == (2, session.config.kv_heads, 4, session.config.head_dim)
    step, present = session.forward(np.array([[9], [9]]), past=present, attention_mask=np.c_[mask, [1, 1]])
    assert step.shape == (2, 1, session.config.vocab_size) and present[0][0].shape[2] == 5


def test_target_and_precision_errors(tiny_bundle):
    with pytest.raises(TargetUnavailable, match="unknown target 'nowhere'"):
        runtime.load(tiny_bundle, target="nowhere")
    with pytest.raises(TargetUnavailable, match="does not support precision 'fp8'"):
        runtime.load(tiny_bundle, precision="fp8")
    with pytest.raises(BundleError, match="no int8 variant"):
        runtime.load(tiny_bundle, precision="int8")


def test_missing_execution_provider_is_unavailable_not_cpu(tiny_bundle):
    import onnxruntime as ort

    missing = next(p for p in ("CUDAExecutionProvider", "ROCMExecutionProvider", "NoSuchExecutionProvider")
                   if p not in ort.get_available_providers())
    target = Target(name="fake-accelerator", runtime="onnxruntime", provider=missing, precisions=("fp32",))
    with pytest.raises(TargetUnavailable, match=missing):
        runtime.OnnxRuntimeBackend().load(tiny_bundle / "fp32" / "model.onnx", target, "fp32")


def test_openvino_backend(tiny_bundle):
    target = Target(name="ov-cpu", runtime="openvino", device="CPU", precisions=("fp32", "fp16"))
    try:
        import openvino  # noqa: F401
    except ImportError:
        with pytest.raises(TargetUnavailable, match=r"pip install edgekit\[openvino\]"):
            runtime.OpenVINOBackend().load(tiny_bundle / "fp32" / "model.onnx", target, "fp32")
        return
    ort_session = runtime.load(tiny_bundle)
    ov_session = runtime.load_model_file(tiny_bundle / "fp32" / "model.onnx", ort_session.config, target, "fp32",
                                         tokenizer=ort_session.tokenizer)
    ids = np.arange(1, 13)[None]
    a, pa = ort_session.forward(ids)
    b, pb = ov_session.forward(ids)
    assert np.abs(a - b).max() <= 1e-4  # f32 inference precision hint, not the bf16 default
    a2, _ = ort_session.forward(ids[:, :3], past=pa)
    b2, _ = ov_session.forward(ids[:, :3], past=pb)
    assert np.abs(a2 - b2).max() <= 1e-4
    assert ov_session.generate("One day", max_new_tokens=8) == ort_session.generate("One day", max_new_tokens=8)
    ov16 = runtime.load_model_file(tiny_bundle / "fp16" / "model.onnx", ort_session.config, target, "fp16")
    assert np.abs(ov16.forward(ids)[0] - a).max() <= 2e-2  # fp16 weights, never bf16 arithmetic


def test_backend_registry_covers_every_runtime():
    assert set(runtime.BACKENDS) == set(RUNTIMES)
    with pytest.raises(TargetUnavailable):
        runtime.get_backend("tvm")


def test_cli_export_then_generate(tiny_checkpoint, tmp_path, capsys):
    from toolkit.cli import main

    out = tmp_path / "bundle"
    assert main(["export", str(tiny_checkpoint), "--out", str(out), "--no-fp16", "--external-data"]) == 0
    assert "bundle:" in capsys.readouterr().out
    assert (out / "fp32" / "model.onnx.data").is_file() and not (out / "fp16").exists()
    assert main(["export", str(tiny_checkpoint), "--out", str(out)]) == 2  # exists, no --overwrite
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]

    proc = _run("-m", "toolkit", "generate", str(out), "One day, Tom", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("One day, Tom")
    proc = _run("-m", "toolkit", "generate", str(out), "One day", "--precision", "fp16")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "no fp16 variant" in proc.stderr
