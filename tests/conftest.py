"""Shared fixtures: a tiny trained checkpoint and a bundle exported from it, made once per test session.

    make_checkpoint(folder, steps=30, seed=0, **model_overrides) -> Path   # any architecture, a few seconds
    tiny_checkpoint   (session)  a default tiny checkpoint (rope, pre-norm, layernorm, gelu; d_model 32, 2 layers)
    tiny_bundle       (session)  that checkpoint exported with fp32 + fp16 variants (do not modify it)
    bundle_copy       (function) a private copy of tiny_bundle that a test may tamper with

Nothing here reads ../shared: the tokenizer is trained on a few hundred stories of the embedded corpus.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TINY = dict(context_len=64, d_model=32, n_layers=2, n_heads=4)
_TOKENIZER = {}


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on 300 embedded stories (cached for the session)."""
    if vocab_size not in _TOKENIZER:
        from toolkit.corpus import default_corpus
        from toolkit.tokenizer import train_tokenizer

        _TOKENIZER[vocab_size] = train_tokenizer(default_corpus(300, seed=0), vocab_size)
    return _TOKENIZER[vocab_size]


def make_checkpoint(folder, steps: int = 30, seed: int = 0, lr: float = 1e-2, **cfg_overrides) -> Path:
    """Write a small checkpoint to `folder`: tiny defaults (TINY) overridden by `cfg_overrides`
    (any ModelConfig field), trained for `steps` AdamW steps on the embedded corpus so its weights and
    logits are not near-random. steps=0 keeps the random initialisation."""
    import torch

    from toolkit.checkpoint import write_checkpoint
    from toolkit.config import ModelConfig
    from toolkit.model import Transformer

    tok = tiny_tokenizer()
    cfg = ModelConfig(**{"vocab_size": tok.get_vocab_size(), **TINY, **cfg_overrides})
    problems = cfg.problems()
    if problems:
        raise ValueError("; ".join(problems))
    torch.manual_seed(seed)
    model = Transformer(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains ~50x faster on one thread of a busy machine
    try:
        _train(model, tok, cfg, steps, seed, lr)
    finally:
        torch.set_num_threads(threads)
    folder = Path(folder)
    write_checkpoint(folder, model, tok, {"recipe": "test-tiny", "step": steps})
    return folder


def _train(model, tok, cfg, steps, seed, lr):
    import numpy as np
    import torch

    from toolkit.corpus import default_corpus
    from toolkit.tokenizer import encode

    if steps:
        ids = np.array([i for s in default_corpus(200, seed=1) for i in encode(tok, s + " ")], dtype=np.int64)
        rng = np.random.default_rng(seed)
        seq = min(32, cfg.context_len - 1)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        model.train()
        for _ in range(steps):
            starts = rng.integers(0, len(ids) - seq - 1, 8)
            batch = torch.from_numpy(np.stack([ids[s: s + seq + 1] for s in starts]))
            loss, _ = model.loss(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    from toolkit.export import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundle") / "tiny", fp16=True)


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst
