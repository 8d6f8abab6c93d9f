"""Next-token sampling over a logits vector: greedy, temperature, top-k, top-p. numpy only."""

from __future__ import annotations

import numpy as np


def sample_next(logits: np.ndarray, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                rng: np.random.Generator | None = None) -> int:
    """Pick the next token id from a (vocab,) logits vector. temperature 0 = greedy (argmax)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k and top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    z -= z.max()
    probs = np.exp(z)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, top_p) + 1)]  # smallest set whose mass reaches top_p
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    rng = rng if rng is not None else np.random.default_rng()
    return int(rng.choice(probs.size, p=probs))
