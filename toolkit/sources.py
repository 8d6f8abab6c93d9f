"""Where a PyTorch reference model comes from: a toolkit checkpoint (or training run folder), or a local
Hugging Face folder (GPT-2 / Llama / Qwen2, see toolkit/hf.py).

Commands that accept "a checkpoint" resolve it here, so other sources plug in at one place. A folder is
taken as Hugging Face when its config.json is an HF config ("architectures" / "model_type") rather than a
toolkit checkpoint's ("format": "edgekit-checkpoint/1").
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import checkpoint
from .runtime.prompt import check_prompt  # noqa: F401  (shared with the on-device runtime)
from .runtime.textstream import stream_text
from .tokenizer import EOS


def load_reference(source: str | Path):
    """(model in eval mode, tokenizer) from a checkpoint, run folder or local Hugging Face folder."""
    from . import hf

    if hf.is_hf_dir(source):
        model, tok, _ = hf.load(source)
    else:
        model, tok, _ = checkpoint.load(source)
    return model, tok


def generate_text(source, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
    model, tok = load_reference(source)
    ids = check_prompt(model.cfg, tok, prompt)
    rng = np.random.default_rng(seed)
    eos = tok.token_to_id(EOS)
    if eos is None:  # a Hugging Face tokenizer: its own end-of-text token
        from .hf import eos_id

        eos = eos_id(source, tok)
    new = model.generate(torch.tensor([ids]), max_new_tokens, temperature, top_k, top_p, eos_id=eos, rng=rng)
    return stream_text(tok, new)
