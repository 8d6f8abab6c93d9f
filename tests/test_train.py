"""Training: the loss falls, resume is bit-exact, saves are atomic, DDP matches one process, bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from toolkit import checkpoint
from toolkit.config import recipe_from_dict
from toolkit.errors import CheckpointError, DataError
from toolkit.train import train

ROOT = Path(__file__).resolve().parent.parent


def tiny_recipe(steps=20, **training):
    t = dict(steps=steps, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=10, eval_batches=2, save_every=10)
    t.update(training)
    return recipe_from_dict({
        "name": "t",
        "model": dict(context_len=64, d_model=32, n_layers=2, n_heads=4, ffn_type="swiglu", n_experts=2, top_k=1,
                      dropout=0.1),
        "tokenizer": dict(vocab_size=320),
        "training": t,
    })


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from toolkit.corpus import default_corpus

    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    path.write_text("\n".join(default_corpus(400)), encoding="utf-8")
    return path


def weights(ckpt):
    return load_file(str(Path(ckpt) / "model.safetensors"))


def metrics(run):
    import json

    return [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls(tmp_path, corpus):
    import math

    train(tiny_recipe(steps=60, lr=1e-2), tmp_path / "run", corpus=str(corpus), progress=False)
    m = metrics(tmp_path / "run")
    uniform = math.log(checkpoint.load(tmp_path / "run")[0].cfg.vocab_size)  # loss of an untrained model
    assert m[-1]["loss"] < 0.7 * uniform
    vals = [r["val_ppl"] for r in m if "val_ppl" in r]
    assert vals == sorted(vals, reverse=True) and vals[-1] < math.exp(0.7 * uniform)
    ckpt = checkpoint.resolve(tmp_path / "run")
    assert ckpt.name == "step-000060"
    assert {p.name for p in ckpt.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json", "train_state.pt"}


def test_resume_is_bit_exact(tmp_path, corpus, monkeypatch):
    """A run of 20 steps killed right after its step-10 checkpoint, then resumed, equals an uninterrupted run
    (dropout and MoE router noise are on, so the RNG state must be restored too)."""
    full = train(tiny_recipe(steps=20), tmp_path / "full", corpus=str(corpus), progress=False)
    real_save = checkpoint.save_run_checkpoint

    def save_then_die(run_dir, step, *a, **k):
        real_save(run_dir, step, *a, **k)
        raise KeyboardInterrupt  # killed just after the first checkpoint

    monkeypatch.setattr(checkpoint, "save_run_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_recipe(steps=20), tmp_path / "part", corpus=str(corpus), progress=False)
    monkeypatch.setattr(checkpoint, "save_run_checkpoint", real_save)
    assert checkpoint.resolve(tmp_path / "part").name == "step-000010"
    resumed = train(tiny_recipe(steps=20), tmp_path / "part", corpus=str(corpus), resume=True, progress=False)
    a, b = weights(full), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in metrics(tmp_path / "part")] == [r["step"] for r in metrics(tmp_path / "full")]


def test_kill_mid_save_keeps_previous_checkpoint(tmp_path, corpus, monkeypatch):
    run = tmp_path / "run"
    train(tiny_recipe(steps=10), run, corpus=str(corpus), progress=False)
    before = weights(checkpoint.resolve(run))

    def dies(*a, **k):
        Path(a[1]).write_bytes(b"partial")  # half-written file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_model", dies)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_recipe(steps=20), run, corpus=str(corpus), resume=True, progress=False)
    ckpt = checkpoint.resolve(run)
    assert ckpt.name == "step-000010"
    after = weights(ckpt)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp")]
    checkpoint.load(run)  # still loads


def test_fine_tune_from_checkpoint(tmp_path, corpus):
    base = train(tiny_recipe(steps=10), tmp_path / "base", corpus=str(corpus), progress=False)
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join('{"text": "The quick brown fox jumps over the lazy dog. %d"}' % i for i in range(300)))
    tuned = train(tiny_recipe(steps=15), tmp_path / "tuned", corpus=str(other), init_from=str(base), progress=False)
    from toolkit.data import load_documents, tokenize_documents
    from toolkit.train import evaluate

    m0, tok0, _ = checkpoint.load(base)
    m1, tok1, _ = checkpoint.load(tuned)
    assert m1.cfg == m0.cfg and tok1.to_str() == tok0.to_str()  # same architecture and tokenizer
    new = tokenize_documents(tok0, load_documents(other), tok0.token_to_id("<|eos|>"))
    assert evaluate(m1, new, 32, 4, 4) < evaluate(m0, new, 32, 4, 4) - 0.5  # adapted to the new corpus


def test_refuses_existing_run_and_bad_corpora(tmp_path, corpus):
    run = tmp_path / "run"
    train(tiny_recipe(steps=10), run, corpus=str(corpus), progress=False)
    with pytest.raises(CheckpointError, match="--resume"):
        train(tiny_recipe(steps=10), run, corpus=str(corpus), progress=False)
    assert checkpoint.resolve(run).name == "step-000010"  # untouched
    with pytest.raises(DataError, match="not found"):
        train(tiny_recipe(), tmp_path / "a", corpus=str(tmp_path / "missing.txt"), progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        train(tiny_recipe(), tmp_path / "b", corpus=str(empty), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "x"}\n')
    with pytest.raises(DataError, match="text"):
        train(tiny_recipe(), tmp_path / "c", corpus=str(bad), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_corrupt_checkpoints_are_refused(tmp_path, corpus):
    ckpt = train(tiny_recipe(steps=10), tmp_path / "run", corpus=str(corpus), progress=False)
    st = ckpt / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        checkpoint.load(ckpt)
    st.write_bytes(data)
    cfg = ckpt / "config.json"
    cfg.write_text(cfg.read_text().replace('"d_model": 32', '"d_model": 64'))
    with pytest.raises(CheckpointError, match="does not match"):
        checkpoint.load(ckpt)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_bad_input_one_line(tmp_path, corpus):
    cases = [
        ["train", "tiny", "--corpus", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x")],
        ["train", "tiny", "--set", "model.d_model=130", "--out", str(tmp_path / "y")],
        ["train", "tiny", "--set", "model.colour=1", "--set", "training.lr=fast", "--out", str(tmp_path / "z")],
        ["generate", str(tmp_path / "nothing"), "hi"],
    ]
    for args in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert "model.colour" in run_cli(*cases[2]).stderr and "training.lr" in run_cli(*cases[2]).stderr
    assert not any((tmp_path / d).exists() for d in "xyz")


def test_cli_generate_and_long_prompt(tmp_path, corpus):
    ckpt = train(tiny_recipe(steps=10), tmp_path / "run", corpus=str(corpus), progress=False)
    r = run_cli("generate", str(tmp_path / "run"), "One day", "--max-new-tokens", "5")
    assert r.returncode == 0 and r.stdout.startswith("One day")
    r = run_cli("generate", str(ckpt), "word " * 200)
    assert r.returncode == 2 and "context window" in r.stderr
    r = run_cli("explain", str(ckpt), "One day, Tom")
    assert r.returncode == 0 and "top-5 next tokens" in r.stdout and "layer 1" in r.stdout


def test_ddp_two_processes_match_one(tmp_path, corpus):
    """torchrun with 2 gloo processes and the same global batch reaches the same weights as 1 process."""
    common = ["tiny", "--corpus", str(corpus), "--steps", "6", "--no-progress",
              "--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=4",
              "--set", "tokenizer.vocab_size=320", "--set", "training.batch_size=4", "--set", "training.seq_len=32",
              "--set", "training.eval_every=5", "--set", "training.save_every=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "toolkit", "train", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                          "-m", "toolkit", "train", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = weights(checkpoint.resolve(tmp_path / "one")), weights(checkpoint.resolve(tmp_path / "two"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    assert not torch.equal(a["layers.0.self_attn.q_proj.weight"], torch.zeros_like(a["layers.0.self_attn.q_proj.weight"]))
