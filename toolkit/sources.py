"""Where a PyTorch reference model comes from: a toolkit checkpoint (or training run folder).

Commands that accept "a checkpoint" resolve it here, so other sources (e.g. a Hugging Face directory)
plug in at one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import checkpoint
from .config import ModelConfig
from .errors import DataError
from .runtime.textstream import stream_text
from .tokenizer import EOS, encode


def load_reference(source: str | Path):
    """(model in eval mode, tokenizer) from a checkpoint or run folder."""
    model, tok, _ = checkpoint.load(source)
    return model, tok


def check_prompt(cfg: ModelConfig, tok, prompt: str) -> list[int]:
    """Prompt ids; refuses (never silently truncates) an empty prompt or one that fills the context."""
    ids = encode(tok, prompt)
    if not ids:
        raise DataError("the prompt is empty (it tokenizes to no tokens)")
    if len(ids) >= cfg.context_len:
        raise DataError(
            f"the prompt is {len(ids)} tokens; the model's context window is {cfg.context_len} "
            f"(prompts are refused, not truncated: shorten it)"
        )
    return ids


def generate_text(source, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
    model, tok = load_reference(source)
    ids = check_prompt(model.cfg, tok, prompt)
    rng = np.random.default_rng(seed)
    eos = tok.token_to_id(EOS)
    new = model.generate(torch.tensor([ids]), max_new_tokens, temperature, top_k, top_p, eos_id=eos, rng=rng)
    return stream_text(tok, new)
