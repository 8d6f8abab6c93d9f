"""Corpora and batches.

A corpus is a text file, a folder of .txt files (sorted by name), or JSONL with a `text` field; with no
path, the embedded default corpus (toolkit/corpus.py). Documents are tokenized into one stream with
<|eos|> between them; the last `val_fraction` of the stream is the validation split (deterministic).

Batches are a pure function of (seed, step): resuming at step N draws exactly the batches an
uninterrupted run would, and data-parallel ranks take interleaved slices of the same global batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import DataError


def load_documents(path: str | Path | None) -> list[str]:
    if path is None:
        from .corpus import default_corpus

        return default_corpus()
    path = Path(path)
    if not path.exists():
        raise DataError(f"corpus not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"corpus folder {path} holds no .txt files")
        docs = [_read_text(p) for p in files]
    elif path.suffix in (".jsonl", ".ndjson"):
        docs = _read_jsonl(path)
    else:
        docs = [_read_text(path)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"corpus {path} is empty (no non-blank text)")
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from None


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{n}: each JSONL line needs a string field \"text\"")
        docs.append(record["text"])
    return docs


def tokenize_documents(tok, docs: list[str], eos_id: int) -> np.ndarray:
    ids: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return np.asarray(ids, dtype=np.int64)


def split(tokens: np.ndarray, val_fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    n_val = max(int(len(tokens) * val_fraction), seq_len + 1)
    if len(tokens) - n_val < seq_len + 1:
        raise DataError(
            f"corpus too small: {len(tokens)} tokens cannot hold a training and a validation window of "
            f"{seq_len + 1} tokens; use more text or a smaller training.seq_len"
        )
    return tokens[:-n_val], tokens[-n_val:]


def get_batch(tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int,
              rank: int = 0, world: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The global batch for `step` is fixed by (seed, step); a rank takes every world-th row of it."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)[rank::world]
    x = np.stack([tokens[s : s + seq_len] for s in starts])
    y = np.stack([tokens[s + 1 : s + seq_len + 1] for s in starts])
    return x, y


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None):
    """Non-overlapping (input, target) windows over a token stream, in order."""
    n = (len(tokens) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    for i in range(n):
        s = i * seq_len
        yield tokens[s : s + seq_len], tokens[s + 1 : s + seq_len + 1]
