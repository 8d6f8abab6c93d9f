"""Host-side runner for static-shape graph pairs (NPUs): the host owns the KV cache. Torch-free.

    session = toolkit.runtime.load("bundles/tiny", target="qnn-htp", precision="a16w8")
    print(session.generate("Once upon a time", max_new_tokens=32))

A static variant (built by toolkit/npu.py, graphs described in toolkit/static_export.py) has a prefill
graph over a window of W positions and a decode graph over a cache of C slots. The host:
1. pads the prompt to W (right padding: prompt in slots 0..n-1; left padding: in slots W-n..W-1),
   runs prefill, and keeps its (1, n_kv, C, hd) present tensors as the cache;
2. per new token runs decode with the cache and a (1, C + 1) mask of the valid slots, and writes the
   returned key/value into the next free slot.
A prompt longer than W is refused (never truncated); generation stops when the C slots are full.

ONNX Runtime sessions here take the target's EP only: a plugin EP (QNN) is registered and selected with
`SessionOptions.add_provider_for_devices`, `session.disable_cpu_ep_fallback` is 1 for every EP but the
CPU's, and after loading every node's EP assignment is checked: a graph with any node elsewhere is
refused (TargetUnavailable), never run half on the CPU.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import probe
from .. import targets as target_profiles
from ..bundle import Bundle
from ..errors import BundleError, DataError, TargetUnavailable, ToolkitError
from ..targets import Target
from ..tokenizer import EOS, load_tokenizer
from .prompt import check_prompt
from .sampling import sample_next
from .textstream import stream_text


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# --- sessions on one EP only -------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_stdout():
    """Silence fd 1 while a native library starts (Qualcomm's HTP simulator prints a 'LIBNATIVE' banner to
    stdout, which would land in the middle of `edgekit generate` output)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def ort_session(model_path: str | Path, target: Target):
    """An onnxruntime.InferenceSession on the target's execution provider and nothing else."""
    import onnxruntime as ort

    usable, reason = probe.availability(target)
    if not usable:
        raise TargetUnavailable(f"target {target.name!r} is not usable here: {reason}")
    opts = dict(target.options)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if "intra_op_num_threads" in opts:
        so.intra_op_num_threads = int(opts["intra_op_num_threads"])
    for key, value in dict(opts.get("session_config", {})).items():
        so.add_session_config_entry(str(key), str(value))
    cpu = target.provider == "CPUExecutionProvider"
    if not cpu:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    provider_options = {str(k): str(v) for k, v in dict(opts.get("provider_options", {})).items()}
    try:
        if target.plugin:
            devices = probe.ep_devices(target)
            so.add_provider_for_devices(devices, provider_options)
            with _quiet_stdout():
                sess = ort.InferenceSession(str(model_path), sess_options=so)
        else:
            sess = ort.InferenceSession(str(model_path), so, providers=[(target.provider, provider_options)])
    except Exception as exc:
        kind = type(exc).__name__
        if kind in ("InvalidProtobuf", "InvalidGraph", "NoSuchFile"):
            raise BundleError(f"ONNX Runtime cannot load {model_path}: {kind}: {_first_line(exc)}") from None
        raise TargetUnavailable(f"target {target.name!r}: {target.provider} cannot run {Path(model_path).name} "
                                f"entirely ({kind}: {_first_line(exc)})") from None
    elsewhere = assignment_elsewhere(sess, target.provider)
    if elsewhere:
        raise TargetUnavailable(f"target {target.name!r}: {len(elsewhere)} node(s) of {Path(model_path).name} "
                                f"were not assigned to {target.provider}: {', '.join(sorted(set(elsewhere))[:8])}")
    return sess


def assignment(sess) -> dict[str, int]:
    """Nodes per execution provider, from ONNX Runtime's recorded graph assignment."""
    counts: dict[str, int] = {}
    for sub in sess.get_provider_graph_assignment_info():
        counts[sub.ep_name] = counts.get(sub.ep_name, 0) + len(sub.get_nodes())
    return counts


def assignment_elsewhere(sess, provider: str) -> list[str]:
    """'EP:OpType' for every node not assigned to `provider` (empty = all on it)."""
    if not hasattr(sess, "get_provider_graph_assignment_info"):
        return [] if provider in sess.get_providers() else [f"?:{provider} not enabled"]
    return [f"{sub.ep_name}:{n.op_type}" for sub in sess.get_provider_graph_assignment_info()
            if sub.ep_name != provider for n in sub.get_nodes()]


class Graph:
    """One static graph on one target: run(feeds) -> {output name: array}."""

    def __init__(self, path: Path, target: Target, precision: str):
        self.path, self.target = path, target
        if target.runtime == "onnxruntime":
            self.sess = ort_session(path, target)
            self.inputs = {i.name: i for i in self.sess.get_inputs()}
            self.outputs = [o.name for o in self.sess.get_outputs()]
            self.device = target.provider
            self._run = lambda feeds: dict(zip(self.outputs, self.sess.run(self.outputs, feeds)))
        else:
            from .backends import get_backend

            usable, reason = probe.availability(target)
            if not usable:
                raise TargetUnavailable(f"target {target.name!r} is not usable here: {reason}")
            backend = get_backend(target.runtime)
            loaded = backend.load(path, target, precision)
            self.inputs, self.outputs, self.device = loaded.inputs, loaded.outputs, loaded.device
            self._run = lambda feeds: backend.run(loaded, feeds)

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        return self._run(feeds)


# --- the host-side cache ---------------------------------------------------------------------------------
@dataclass
class StaticCache:
    """The fixed-size KV cache a static session keeps on the host."""

    kv: list[np.ndarray]  # per layer key, value: (1, n_kv, C, hd)
    mask: np.ndarray  # (1, C + 1) int64; entry C (the new token) is always 1
    slot: int  # next free slot
    position: int  # position id of the next token

    @property
    def full(self) -> bool:
        return self.slot >= self.mask.shape[1] - 1


class StaticSession:
    """Generation and logits with a static prefill / decode pair. Same surface as runtime.Session:
    forward(), generate_ids(), stream(), generate()."""

    def __init__(self, bundle: Bundle, variant, target: Target, precision: str, padding: str = "right"):
        if padding not in ("right", "left"):
            raise DataError(f"padding must be 'right' or 'left' (got {padding!r})")
        info = variant.export
        if not info.get("static"):
            raise BundleError(f"variant {variant.name!r} is not a static-shape variant")
        try:
            self.window, self.cache_len = int(info["window"]), int(info["cache"])
            prefill, decode = info["prefill"], info["decode"]
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"static variant {variant.name!r} lacks window / cache / prefill / decode") from None
        self.bundle, self.variant, self.target, self.precision, self.padding = bundle, variant, target, precision, padding
        self.config = bundle.model_config
        self.n_layers = self.config.n_layers
        self.prefill_graph = Graph(bundle.path_of(prefill), target, precision)
        self.decode_graph = Graph(bundle.path_of(decode), target, precision)
        try:
            self.tokenizer = load_tokenizer(bundle.tokenizer_path)
        except ToolkitError as exc:
            raise BundleError(f"bundle {bundle.root}: {exc}") from None
        special = bundle.manifest.get("special_tokens") if isinstance(bundle.manifest.get("special_tokens"), dict) else {}
        self.eos_id = self.tokenizer.token_to_id(special.get("eos", EOS))

    @property
    def device(self) -> str:
        return self.prefill_graph.device

    # --- the two graphs ------------------------------------------------------------------------------
    def prefill(self, ids) -> tuple[np.ndarray, StaticCache]:
        """Logits (n, vocab) for a prompt of n <= W tokens, and the cache after it."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        n, W, C = len(ids), self.window, self.cache_len
        if n == 0:
            raise DataError("the prompt is empty (it tokenizes to no tokens)")
        if n > W:
            raise DataError(f"the prompt is {n} tokens; the {self.target.name} graphs take at most {W} "
                            f"(the static prefill window): shorten it, or rebuild the variant with a larger --window")
        start = 0 if self.padding == "right" else W - n
        x = np.zeros((1, W), np.int64)
        pos = np.zeros((1, W), np.int64)
        mask = np.zeros((1, W), np.int64)
        x[0, start:start + n] = ids
        pos[0, start:start + n] = np.arange(n)
        mask[0, start:start + n] = 1
        out = self.prefill_graph.run({"input_ids": x, "position_ids": pos, "attention_mask": mask})
        kv = [np.array(out[f"present.{i}.{t}"], dtype=np.float32) for i in range(self.n_layers) for t in ("key", "value")]
        cmask = np.zeros((1, C + 1), np.int64)
        cmask[0, start:start + n] = 1
        cmask[0, C] = 1
        logits = np.asarray(out["logits"], dtype=np.float32)[0, start:start + n]
        return logits, StaticCache(kv, cmask, start + n, n)

    def step(self, token: int, cache: StaticCache) -> tuple[np.ndarray, StaticCache]:
        """Logits (vocab,) after one more token; writes its key/value into the cache's next slot."""
        if cache.full:
            raise DataError(f"the static KV cache is full ({self.cache_len} slots)")
        if cache.position >= self.config.context_len:
            raise DataError(f"position {cache.position} is outside the model's context ({self.config.context_len})")
        feeds = {"input_ids": np.array([[int(token)]], np.int64),
                 "position_ids": np.array([[cache.position]], np.int64), "attention_mask": cache.mask}
        for i in range(self.n_layers):
            feeds[f"past_key_values.{i}.key"] = cache.kv[2 * i]
            feeds[f"past_key_values.{i}.value"] = cache.kv[2 * i + 1]
        out = self.decode_graph.run(feeds)
        s = cache.slot
        for i in range(self.n_layers):
            cache.kv[2 * i][:, :, s:s + 1] = out[f"new.{i}.key"]
            cache.kv[2 * i + 1][:, :, s:s + 1] = out[f"new.{i}.value"]
        cache.mask[0, s] = 1
        cache.slot, cache.position = s + 1, cache.position + 1
        return np.asarray(out["logits"], dtype=np.float32)[0, 0], cache

    # --- runtime.Session-compatible surface ------------------------------------------------------------
    def forward(self, input_ids, past: StaticCache | None = None, attention_mask=None, position_ids=None):
        """(logits (1, T, vocab), cache). Without `past`: the first min(T, W) tokens go through prefill and
        the rest through decode steps (so any T up to the cache size works); with `past`: decode steps."""
        if attention_mask is not None or position_ids is not None:
            raise DataError("a static session builds its own attention mask and positions")
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise DataError(f"a static session takes input_ids of shape (1, tokens), got {ids.shape}")
        ids = ids[0].tolist()
        rows = []
        if past is None:
            head = ids[: self.window]
            logits, past = self.prefill(head)
            rows.append(logits)
            ids = ids[len(head):]
        for t in ids:
            logits, past = self.step(t, past)
            rows.append(logits[None])
        return np.concatenate(rows)[None], past

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> Iterator[int]:
        """New token ids. Stops at <|eos|> (not yielded), after max_new_tokens, or when the cache or the
        model's context is full."""
        rng = np.random.default_rng(seed)
        logits, cache = self.prefill(prompt_ids)
        logits = logits[-1]
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, rng)
            if nxt == self.eos_id:
                return
            yield nxt
            if cache.full or cache.position >= self.config.context_len:
                return
            logits, cache = self.step(nxt, cache)

    def stream(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
        ids = check_prompt(self.config, self.tokenizer, prompt)
        if len(ids) > self.window:  # checked now, not at the first next()
            self.prefill(ids)
        return stream_text(self.tokenizer, self.generate_ids(ids, max_new_tokens, temperature, top_k, top_p, seed))

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None) -> str:
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed))


def wants_static(target: str | Target) -> bool:
    tgt = target if isinstance(target, Target) else target_profiles.get(target)
    return tgt.static_shapes


def load_static(bundle: str | Path | Bundle, target: str | Target, precision: str, padding: str = "right") -> StaticSession:
    """Open a bundle and load its static variant for (precision, target)."""
    tgt = target if isinstance(target, Target) else target_profiles.get(target)
    if precision not in tgt.precisions:
        raise TargetUnavailable(f"target {tgt.name!r} does not support precision {precision!r} "
                                f"(it supports: {', '.join(tgt.precisions)})")
    b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    variant = b.variant(precision, tgt.name)
    if not variant.export.get("static"):
        raise BundleError(f"variant {variant.name!r} of bundle {b.root} is not static-shape; {tgt.name} needs "
                          f"static graphs: build them with `edgekit npu-build {b.root}`")
    return StaticSession(b, variant, tgt, precision, padding)
