"""Sessions: a bundle variant loaded on a target, with a KV-cache forward pass and text generation.

    session = toolkit.runtime.load("bundles/tiny", target="cpu", precision="fp32")
    logits, present = session.forward(np.array([[1, 2, 3]]))              # prefill
    logits, present = session.forward(np.array([[4]]), past=present)      # one cached step
    for piece in session.stream("Once upon a time", max_new_tokens=32): print(piece, end="")

Imports numpy, tokenizers and (lazily, through the backend) onnxruntime or openvino. Never torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from .. import targets as target_profiles
from ..bundle import Bundle
from ..config import ModelConfig
from ..errors import BundleError, DataError, TargetUnavailable, ToolkitError
from ..targets import Target
from ..tokenizer import EOS, load_tokenizer
from .backends import Loaded, get_backend
from .prompt import check_prompt
from .sampling import sample_next
from .textstream import stream_text

KV = list[tuple[np.ndarray, np.ndarray]]


def _target(target: str | Target) -> Target:
    return target if isinstance(target, Target) else target_profiles.get(target)


class Session:
    """One model graph on one target. Build with `load` (a bundle) or `load_model_file` (a bare .onnx)."""

    def __init__(self, cfg: ModelConfig, loaded: Loaded, backend, target: Target, precision: str,
                 tokenizer=None, bundle: Bundle | None = None, variant=None, eos_token: str = EOS):
        self.config, self.loaded, self.backend = cfg, loaded, backend
        self.target, self.precision = target, precision
        self.tokenizer, self.bundle, self.variant = tokenizer, bundle, variant
        self.eos_id = tokenizer.token_to_id(eos_token) if tokenizer is not None and eos_token else None
        self.n_layers = cfg.n_layers
        missing = [n for n in ("input_ids", "position_ids", "attention_mask", "past_key_values.0.key")
                   if n not in loaded.inputs]
        if missing or "logits" not in loaded.outputs:
            raise BundleError(f"the model graph does not follow the edgekit I/O contract (missing {missing or ['logits']})")

    @property
    def kv_dtype(self) -> np.dtype:
        return self.loaded.inputs["past_key_values.0.key"]

    @property
    def device(self) -> str:
        return self.loaded.device

    # --- one forward pass ---------------------------------------------------------------------------
    def feeds(self, input_ids, past: KV | None = None, attention_mask=None, position_ids=None) -> dict:
        """The graph inputs for a forward pass (defaults: positions P..P+T-1, no padding)."""
        cfg = self.config
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise DataError(f"input_ids must have shape (batch, tokens) with tokens >= 1, got {input_ids.shape}")
        B, T = input_ids.shape
        if past is None:
            empty = np.zeros((B, cfg.kv_heads, 0, cfg.head_dim), self.kv_dtype)
            past = [(empty, empty)] * self.n_layers
        if len(past) != self.n_layers:
            raise DataError(f"past has {len(past)} layers; the model has {self.n_layers}")
        P = past[0][0].shape[2]
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(P, P + T, dtype=np.int64), (B, T))
        position_ids = np.asarray(position_ids, dtype=np.int64)
        if position_ids.size and int(position_ids.max()) >= cfg.context_len:
            raise DataError(f"position {int(position_ids.max())} is outside the model's context window "
                            f"({cfg.context_len} positions)")
        if attention_mask is None:
            attention_mask = np.ones((B, P + T), np.int64)
        feeds = {"input_ids": input_ids.astype(np.int64, copy=False),
                 "position_ids": np.ascontiguousarray(position_ids),
                 "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        for i, (k, v) in enumerate(past):
            feeds[f"past_key_values.{i}.key"] = np.asarray(k, dtype=self.kv_dtype)
            feeds[f"past_key_values.{i}.value"] = np.asarray(v, dtype=self.kv_dtype)
        return feeds

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        """All graph outputs by name (logits, present.*, and hidden_states.* in a debug export)."""
        return self.backend.run(self.loaded, feeds)

    def forward(self, input_ids, past: KV | None = None, attention_mask=None, position_ids=None):
        """(logits float32 (B, T, vocab), present: per layer (key, value) of (B, n_kv, P+T, hd) in the
        graph's KV dtype, ready to pass back as `past`)."""
        out = self.run(self.feeds(input_ids, past, attention_mask, position_ids))
        present = [(out[f"present.{i}.key"], out[f"present.{i}.value"]) for i in range(self.n_layers)]
        return out["logits"].astype(np.float32, copy=False), present

    # --- generation ---------------------------------------------------------------------------------
    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> Iterator[int]:
        """New token ids, one at a time. Stops at <|eos|> (not yielded), after max_new_tokens, or when
        the context window is full — the same rule as Transformer.generate."""
        if len(prompt_ids) >= self.config.context_len:
            raise DataError(f"the prompt is {len(prompt_ids)} tokens; the context window is {self.config.context_len}")
        rng = np.random.default_rng(seed)
        eos = self.eos_id
        logits, past = self.forward(np.asarray([prompt_ids], dtype=np.int64))
        for n in range(max_new_tokens):
            nxt = sample_next(logits[0, -1], temperature, top_k, top_p, rng)
            if nxt == eos:
                return
            yield nxt
            if len(prompt_ids) + n + 1 >= self.config.context_len:
                return
            logits, past = self.forward(np.asarray([[nxt]], dtype=np.int64), past)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise BundleError("this session has no tokenizer; load it from a bundle")
        return self.tokenizer

    def stream(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
        """Text pieces of the continuation. The prompt is checked now (DataError if empty or too long)."""
        tok = self._need_tokenizer()
        ids = check_prompt(self.config, tok, prompt)
        return stream_text(tok, self.generate_ids(ids, max_new_tokens, temperature, top_k, top_p, seed))

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None) -> str:
        """The continuation (without the prompt)."""
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed))


def _check_precision(target: Target, precision: str):
    if precision not in target.precisions:
        raise TargetUnavailable(f"target {target.name!r} does not support precision {precision!r} "
                                f"(it supports: {', '.join(target.precisions)})")


def load(bundle: str | Path | Bundle, target: str | Target = "cpu", precision: str = "fp32") -> Session:
    """Open (and verify) a bundle, pick the variant for (precision, target), load it on the target."""
    tgt = _target(target)
    _check_precision(tgt, precision)
    b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    variant = b.variant(precision, tgt.name)
    backend = get_backend(tgt.runtime)
    loaded = backend.load(b.path_of(variant.model), tgt, precision)
    try:
        tok = load_tokenizer(b.tokenizer_path)
    except ToolkitError as exc:
        raise BundleError(f"bundle {b.root}: {exc}") from None
    cfg = b.model_config
    if tok.get_vocab_size() != cfg.vocab_size:
        raise BundleError(f"bundle {b.root}: tokenizer has {tok.get_vocab_size()} tokens, model expects {cfg.vocab_size}")
    special = b.manifest.get("special_tokens") if isinstance(b.manifest.get("special_tokens"), dict) else {}
    eos = special.get("eos", EOS) if "eos" in special else EOS  # Hugging Face imports name their own eos
    return Session(cfg, loaded, backend, tgt, precision, tokenizer=tok, bundle=b, variant=variant, eos_token=eos)


def load_model_file(model_path: str | Path, cfg: ModelConfig, target: str | Target = "cpu",
                    precision: str = "fp32", tokenizer=None) -> Session:
    """A session on a bare ONNX file outside any bundle (e.g. a debug export with hidden_states.* outputs)."""
    tgt = _target(target)
    _check_precision(tgt, precision)
    backend = get_backend(tgt.runtime)
    return Session(cfg, backend.load(Path(model_path), tgt, precision), backend, tgt, precision, tokenizer=tokenizer)
