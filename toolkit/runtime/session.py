"""Sessions: a bundle variant loaded on a target, with a KV-cache forward pass and text generation.

    session = toolkit.runtime.load("bundles/tiny", target="cpu", precision="fp32")
    logits, present = session.forward(np.array([[1, 2, 3]]))              # prefill
    logits, present = session.forward(np.array([[4]]), past=present)      # one cached step
    for piece in session.stream("Once upon a time", max_new_tokens=32): print(piece, end="")

Generation (`generate_ids`, `stream`, `generate`) runs a decode loop (`Session.decoder`):
- ONNX Runtime, fused graph (toolkit/fastgraph.py, variant export "shared_kv"): `SharedKVDecoder` keeps
  the KV cache inside the runtime. One preallocated (1, n_kv, C, hd) buffer per layer and per key/value
  is bound as both `past_key_values.i.*` and `present.i.*` with I/O binding; GroupQueryAttention writes
  each new key/value in place — no concatenation, no copy, no allocation per step. Token / position
  inputs and the logits output are numpy arrays shared with bound OrtValues, so a step is one
  `run_with_iobinding` call.
- anything else: `Decoder`, the `forward` loop with numpy arrays. (Binding the exported graph's ORT-
  allocated `present.*` as the next step's `past_key_values.*` was measured and gave nothing: that
  graph's Concat copies the cache every step anyway; see BENCHMARKS.md.)
Both give the same tokens and logits as the plain `forward` loop (tests/test_bench.py checks it).

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
DERIVED_INPUTS = ("attention_bias", "seqlens_k", "total_sequence_length")  # as toolkit.fastgraph.DERIVED_INPUTS
MASK_VALUE = -1e4  # as toolkit.model.MASK_VALUE


def derived_feeds(attention_mask: np.ndarray, T: int) -> dict:
    """A fused graph's inputs derived from attention_mask (B, P+T): the additive padding bias
    (B, 1, T, P+T), seqlens_k (B,) = P+T-1 and total_sequence_length = P+T (see toolkit/fastgraph.py)."""
    B, L = attention_mask.shape
    bias = np.where(attention_mask != 0, np.float32(0), np.float32(MASK_VALUE)).astype(np.float32)
    return {"attention_bias": np.ascontiguousarray(np.broadcast_to(bias[:, None, None, :], (B, 1, T, L))),
            "seqlens_k": np.full((B,), L - 1, np.int32), "total_sequence_length": np.array(L, np.int32)}


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
        export = dict(getattr(variant, "export", None) or {})
        self.derived_inputs = all(n in loaded.inputs for n in DERIVED_INPUTS)  # a fused graph's mask-derived inputs
        # fused graph: in-place KV buffers for generation (a bare fused file, loaded without a variant, too)
        self.shared_kv = bool(export.get("shared_kv")) or (variant is None and self.derived_inputs)

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
        if self.derived_inputs:
            feeds.update(derived_feeds(feeds["attention_mask"], T))
        return feeds

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        """All graph outputs by name (logits, present.*, and hidden_states.* in a debug export)."""
        return self.backend.run(self.loaded, feeds)

    def forward(self, input_ids, past: KV | None = None, attention_mask=None, position_ids=None):
        """(logits float32 (B, T, vocab), present: per layer (key, value) of (B, n_kv, P+T, hd) in the
        graph's KV dtype, ready to pass back as `past`)."""
        ids = np.asarray(input_ids)
        if (self.shared_kv and ids.ndim == 2 and ids.shape[0] > 1 and ids.shape[1] > 1 and past is not None
                and past[0][0].shape[2] > 0):
            return self._forward_rows(ids, past, attention_mask, position_ids)
        out = self.run(self.feeds(input_ids, past, attention_mask, position_ids))
        present = [(out[f"present.{i}.key"], out[f"present.{i}.value"]) for i in range(self.n_layers)]
        return out["logits"].astype(np.float32, copy=False), present

    def _forward_rows(self, ids, past, attention_mask, position_ids):
        """GroupQueryAttention refuses batch > 1 with both a past and several new tokens: one row at a time."""
        rows = []
        for b in range(ids.shape[0]):
            pick = lambda a: None if a is None else np.asarray(a)[b:b + 1]  # noqa: E731
            rows.append(self.forward(ids[b:b + 1], [(k[b:b + 1], v[b:b + 1]) for k, v in past],
                                     pick(attention_mask), pick(position_ids)))
        logits = np.concatenate([r[0] for r in rows])
        present = [(np.concatenate([r[1][i][0] for r in rows]), np.concatenate([r[1][i][1] for r in rows]))
                   for i in range(self.n_layers)]
        return logits, present

    def decoder(self, capacity: int | None = None) -> "Decoder":
        """A decode loop for one sequence (batch 1) holding at most `capacity` positions (default: the
        model's context): `SharedKVDecoder` for a fused graph on ONNX Runtime, else `Decoder` (see the
        module docstring)."""
        capacity = min(int(capacity or self.config.context_len), self.config.context_len)
        if "forward" in self.__dict__:  # forward() overridden on this instance (a test or tracing hook): honour it
            return Decoder(self, capacity)
        if self.shared_kv and self.backend.name == "onnxruntime" and hasattr(self.loaded.handle, "io_binding"):
            return SharedKVDecoder(self, capacity)
        return Decoder(self, capacity)

    # --- generation ---------------------------------------------------------------------------------
    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> Iterator[int]:
        """New token ids, one at a time. Stops at <|eos|> (not yielded), after max_new_tokens, or when
        the context window is full — the same rule as Transformer.generate."""
        if len(prompt_ids) >= self.config.context_len:
            raise DataError(f"the prompt is {len(prompt_ids)} tokens; the context window is {self.config.context_len}")
        rng = np.random.default_rng(seed)
        eos = self.eos_id
        dec = self.decoder(len(prompt_ids) + max(int(max_new_tokens), 1))
        logits = dec.prefill(prompt_ids)
        for n in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, rng)
            if nxt == eos:
                return
            yield nxt
            if len(prompt_ids) + n + 1 >= self.config.context_len:
                return
            logits = dec.step(nxt)

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


# --- decode loops (batch 1) ----------------------------------------------------------------------------
class Decoder:
    """prefill(prompt ids) -> last logits (vocab,) float32; step(token) -> logits (vocab,). Generic
    version: `Session.forward` with numpy KV arrays (any backend)."""

    def __init__(self, session: Session, capacity: int):
        self.session, self.capacity, self.length = session, capacity, 0
        self.past = None

    def _check(self, n: int):
        if n < 1:
            raise DataError("the prompt is empty (it tokenizes to no tokens)")
        if self.length + n > self.capacity:
            raise DataError(f"the decoder holds {self.capacity} positions; {self.length + n} requested")

    def prefill(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        self._check(ids.shape[1])
        logits, self.past = self.session.forward(ids)
        self.length = ids.shape[1]
        return logits[0, -1]

    def step(self, token: int) -> np.ndarray:
        self._check(1)
        logits, self.past = self.session.forward(np.array([[int(token)]], np.int64), self.past)
        self.length += 1
        return logits[0, -1]


class SharedKVDecoder(Decoder):
    """ONNX Runtime I/O binding on a fused graph (GroupQueryAttention): the cache is one preallocated
    (1, n_kv, capacity, hd) buffer per layer and key/value, bound as both past and present, written in
    place by the kernel. The token, position, seqlens_k and total_sequence_length inputs and the logits
    output are numpy arrays shared with bound OrtValues (updated in place); a step rebinds only the
    attention mask and bias, views of preallocated rows (ones / zeros: one sequence has no padding)."""

    def __init__(self, session: Session, capacity: int):
        super().__init__(session, capacity)
        import onnxruntime as ort

        cfg, dtype = session.config, session.kv_dtype
        self.ort, self.sess = ort, session.loaded.handle
        self.kv = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, cfg.kv_heads, capacity, cfg.head_dim), dtype))
                   for _ in range(2 * session.n_layers)]
        self.ones = np.ones((1, capacity), np.int64)
        self.zeros = np.zeros((1, 1, 1, capacity), np.float32)
        self.token = np.zeros((1, 1), np.int64)
        self.position = np.zeros((1, 1), np.int64)
        self.seqlens = np.zeros((1,), np.int32)
        self.total = np.zeros((), np.int32)
        self.logits = np.zeros((1, 1, cfg.vocab_size), _np_dtype(session.loaded, "logits"))
        ov = ort.OrtValue.ortvalue_from_numpy
        self.binding = self._bind(ov(self.token), ov(self.position), ov(self.logits))

    def _bind(self, ids, positions, logits):
        b = self.sess.io_binding()
        b.bind_ortvalue_input("input_ids", ids)
        b.bind_ortvalue_input("position_ids", positions)
        if self.session.derived_inputs:
            b.bind_ortvalue_input("seqlens_k", self.ort.OrtValue.ortvalue_from_numpy(self.seqlens))
            b.bind_ortvalue_input("total_sequence_length", self.ort.OrtValue.ortvalue_from_numpy(self.total))
        if logits is None:  # bound first: get_outputs() lists outputs in binding order
            b.bind_output("logits", "cpu")
        else:
            b.bind_ortvalue_output("logits", logits)
        for i in range(self.session.n_layers):
            for j, t in enumerate(("key", "value")):
                b.bind_ortvalue_input(f"past_key_values.{i}.{t}", self.kv[2 * i + j])
                b.bind_ortvalue_output(f"present.{i}.{t}", self.kv[2 * i + j])
        return b

    def _lengths(self, b, T: int, L: int):
        b.bind_cpu_input("attention_mask", self.ones[:, :L])
        if self.session.derived_inputs:
            self.seqlens[0], self.total[()] = L - 1, L
            bias = self.zeros[:, :, :, :L] if T == 1 else np.zeros((1, 1, T, L), np.float32)
            b.bind_cpu_input("attention_bias", bias)

    def prefill(self, ids) -> np.ndarray:
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(1, -1))
        T = ids.shape[1]
        self.length = 0
        self._check(T)
        ov = self.ort.OrtValue.ortvalue_from_numpy
        b = self._bind(ov(ids), ov(np.arange(T, dtype=np.int64)[None]), None)
        self._lengths(b, T, T)
        self.sess.run_with_iobinding(b)
        self.length = T
        return np.asarray(b.get_outputs()[0].numpy()[0, -1], dtype=np.float32)

    def step(self, token: int) -> np.ndarray:
        self._check(1)
        P = self.length
        self.token[0, 0], self.position[0, 0] = int(token), P
        self._lengths(self.binding, 1, P + 1)
        self.sess.run_with_iobinding(self.binding)
        self.length = P + 1
        return self.logits[0, 0].astype(np.float32)  # a copy: the buffer is overwritten by the next step


def _np_dtype(loaded: Loaded, output: str) -> np.dtype:
    """numpy dtype of a graph output (ONNX Runtime sessions)."""
    for o in loaded.handle.get_outputs():
        if o.name == output:
            return {"tensor(float16)": np.float16}.get(o.type, np.float32)
    return np.float32


def _check_precision(target: Target, precision: str):
    if precision not in target.precisions:
        raise TargetUnavailable(f"target {target.name!r} does not support precision {precision!r} "
                                f"(it supports: {', '.join(target.precisions)})")


def pick_variant(b: Bundle, precision: str, target: Target, name: str | None = None):
    """The variant to run for (precision, target): `name` when given, else a fused graph
    (toolkit/fastgraph.py, export "fused") when the bundle has one for the target, else the first match."""
    if name is not None:
        found = [v for v in b.variants if v.name == name]
        if not found:
            raise BundleError(f"bundle {b.root} has no variant named {name!r}; it has: "
                              f"{', '.join(v.name for v in b.variants) or 'none'}")
        v = found[0]
        if v.precision != precision or target.name not in v.targets:
            raise BundleError(f"variant {name!r} is {v.precision} for targets {', '.join(v.targets) or '-'}, "
                              f"not {precision} for {target.name}")
        return v
    first = b.variant(precision, target.name)  # BundleError listing what there is
    fused = [v for v in b.variants if v.precision == precision and target.name in v.targets and v.export.get("fused")]
    return fused[0] if fused and target.runtime == "onnxruntime" else first


def load(bundle: str | Path | Bundle, target: str | Target = "cpu", precision: str = "fp32",
         variant: str | None = None) -> Session:
    """Open (and verify) a bundle, pick the variant for (precision, target) (see `pick_variant`; `variant`
    names one explicitly), load it on the target."""
    tgt = _target(target)
    _check_precision(tgt, precision)
    b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    variant = pick_variant(b, precision, tgt, variant)
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
