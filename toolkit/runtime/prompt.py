"""Prompt checks shared by the PyTorch path (toolkit.sources) and the on-device runtime. Torch-free."""

from __future__ import annotations

from ..errors import DataError
from ..tokenizer import encode


def check_prompt(cfg, tok, prompt: str) -> list[int]:
    """Prompt ids; refuses (never silently truncates) an empty prompt or one that fills the context.
    `cfg` is anything with a `context_len` (a ModelConfig)."""
    ids = encode(tok, prompt)
    if not ids:
        raise DataError("the prompt is empty (it tokenizes to no tokens)")
    if len(ids) >= cfg.context_len:
        raise DataError(
            f"the prompt is {len(ids)} tokens; the model's context window is {cfg.context_len} "
            f"(prompts are refused, not truncated: shorten it)"
        )
    return ids
