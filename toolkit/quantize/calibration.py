"""Calibration data for static / data-aware quantization: text -> token windows -> graph feeds.

Default text (no --calibration): the training corpus the bundle's source checkpoint records in its
config.json ("corpus") when that file is readable here, else the embedded corpus drawn with seed 7 (the
same draw `edgekit npu-build` uses; parity's default evaluation text is a different draw, seed 4242, so
calibrating never sees the evaluation stories). Pass --calibration for anything else.

A feed is one window of `window` tokens with the dynamic graph's full input set: input_ids, position_ids
0..T-1, attention_mask of ones and an empty (P = 0) past for every layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, QuantizationError

DEFAULT_SEED = 7
MAX_WINDOW = 128  # calibration window length: min(context_len, MAX_WINDOW)
MIN_WINDOWS = 4  # fewer full windows than this is "too small a calibration set"
MAX_CHARS = 2_000_000  # only the first ~2 MB of a large corpus are tokenized


@dataclass
class Calibration:
    ids: np.ndarray  # token ids
    source: str  # what the text was
    window: int
    windows: int  # windows used

    def describe(self) -> dict:
        return {"source": self.source, "tokens": int(len(self.ids)), "window": self.window, "windows": self.windows}


def _default_source(bundle) -> str | None:
    """The training corpus recorded by the bundle's source checkpoint, when it exists on this machine."""
    ckpt = (bundle.manifest.get("source") or {}).get("checkpoint")
    if not ckpt:
        return None
    try:
        corpus = json.loads((Path(ckpt) / "config.json").read_text(encoding="utf-8")).get("corpus")
    except (OSError, ValueError):
        return None
    if not corpus:
        return None
    for base in (Path.cwd(), Path(ckpt), Path(ckpt).parent, Path(ckpt).parent.parent):
        p = Path(corpus) if Path(corpus).is_absolute() else base / corpus
        if p.exists():
            return str(p.resolve())
    return None


def load_calibration(bundle, tok, path: str | Path | None, cfg, windows: int = 16) -> Calibration:
    """Token ids of the calibration text; QuantizationError when it is empty or too small."""
    from ..data import load_documents, tokenize_documents
    from ..tokenizer import EOS

    window = min(cfg.context_len, MAX_WINDOW)
    if path is None:
        found = _default_source(bundle)
        if found:
            path, source = found, f"{found} (the source checkpoint's training corpus)"
        else:
            from ..corpus import default_corpus

            docs = default_corpus(400, seed=DEFAULT_SEED)
            source = f"built-in: toolkit.corpus.default_corpus(400, seed={DEFAULT_SEED})"
    else:
        source = str(path)
    if path is not None:
        try:
            docs = load_documents(path)
        except DataError as exc:
            raise QuantizationError(f"calibration text: {exc}") from None
        kept, total = [], 0
        for d in docs:
            kept.append(d[: MAX_CHARS - total])
            total += len(kept[-1])
            if total >= MAX_CHARS:
                break
        docs = kept
    eos = tok.token_to_id(EOS)
    ids = tokenize_documents(tok, docs, eos) if eos is not None else np.asarray(
        [i for d in docs for i in tok.encode(d, add_special_tokens=False).ids], dtype=np.int64)
    content = ids[ids != eos] if eos is not None else ids
    if len(content) == 0:
        raise QuantizationError(f"calibration text {source} tokenizes to nothing (no tokens besides <|eos|>)")
    need = MIN_WINDOWS * window
    if len(ids) < need:
        raise QuantizationError(f"calibration text {source} is {len(ids)} tokens; at least {need} are needed "
                                f"({MIN_WINDOWS} windows of {window}); pass a longer --calibration text")
    n = max(MIN_WINDOWS, min(windows, len(ids) // window))
    return Calibration(ids=ids, source=source, window=window, windows=n)


def feeds(cal: Calibration, cfg, n: int | None = None, seed: int = 0, kv_dtype=np.float32) -> list[dict]:
    """`n` windows (default cal.windows) spread evenly over the calibration tokens."""
    n = n or cal.windows
    W = cal.window
    starts = np.linspace(0, len(cal.ids) - W, n).astype(int)
    empty = np.zeros((1, cfg.kv_heads, 0, cfg.head_dim), kv_dtype)
    out = []
    for s in starts:
        f = {"input_ids": cal.ids[s:s + W][None].astype(np.int64),
             "position_ids": np.arange(W, dtype=np.int64)[None],
             "attention_mask": np.ones((1, W), np.int64)}
        for i in range(cfg.n_layers):
            f[f"past_key_values.{i}.key"] = empty
            f[f"past_key_values.{i}.value"] = empty
        out.append(f)
    return out


def ort_reader(feed_list: list[dict]):
    """An onnxruntime.quantization.CalibrationDataReader over a list of feeds (rewindable)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self, items):
            self.items = items
            self._it = iter(items)

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(self.items)

        def __iter__(self):
            return iter(self.items)

        def __len__(self):
            return len(self.items)

        def __deepcopy__(self, memo):  # GPTQ deep-copies the reader; the feeds are read-only
            return Reader(self.items)

    return Reader(feed_list)
