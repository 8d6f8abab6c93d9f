"""Memory-fit planner: will this model fit this target, and in which precisions? Torch-free.

    edgekit fit bundles/tiny --target qnn-htp --context 256
    edgekit fit --params 7e9 --target gpu            # a generic llama-like shape of 7B parameters

Estimate (bytes) for a precision p, batch B, context N (prompt + generated positions):
    weights      = matrix params x bits(p) / 8  +  other params (norms, biases) x 4 (fp16/bf16: 2)
    scales       = 4-bit: one fp16 scale + one 4-bit zero point per group of 32 weights; int8: one
                   fp32 scale per output channel; float precisions: none
    kv_cache     = 2 x layers x kv_heads x head_dim x N x B x kv_bytes(p)
    activations  = the largest forward pass, over T = N positions (a static target: its window):
                   B x T x (vocab [logits] + 4 d_model + 3 ffn_hidden) x act_bytes
                   + B x heads x T x N x ATTN_COPIES x act_bytes [scores, masked scores, probabilities,
                   mask: the exported graph materialises the whole attention matrix]
    peak         = max(load, generate)
        load     = LOAD_FACTOR x (weights + scales) [+ an upcast copy] + RUNTIME_BASE: while a bundle is
                   verified and its session built, the model file's pages and the initializers can be
                   resident at once (measured between 1.2x and 2.4x the weights, varying run to run)
        generate = weights + scales [+ an upcast copy] + KV_COPIES x kv_cache + activations + RUNTIME_BASE
                   (a decode step's present outputs exist while its past inputs are alive)
    overhead     = peak - (weights + scales + kv_cache + activations), the "overhead" column.
A target may compute a precision in another one (targets/*.toml `compute`, e.g. ONNX Runtime's x86 CPU
EP runs fp16 graphs in fp32): then an upcast copy of the weights is held as well (measured: the fp16
initializers stay resident next to the fp32 copies) and activations use the compute type.
The constants were measured with scripts/fit_measure.py (peak RSS of a process that loads a bundle with
toolkit.runtime and generates, minus the process's RSS peak after its imports); its docstring has the
method and the figures.
A target's memory_budget_mb is in MiB; 0 means the host's memory (MemAvailable of /proc/meminfo).
The reference table holds: 7B parameters -> weights of 28 GB fp32, 14 GB fp16, 7 GB int8, 3.5 GB 4-bit.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import ModelConfig, model_config_from_dict
from .errors import ConfigError
from .targets import PRECISIONS, Target

LOAD_FACTOR = 1.6  # weight copies while loading: measured 1.2x or ~2x from run to run (scripts/fit_measure.py)
KV_COPIES = 2.0  # past + present alive during a decode step
ATTN_COPIES = 4  # (B, heads, T, N) tensors alive at once in the exported attention: scores, masked, probs, mask
RUNTIME_BASE_BYTES = 18e6  # session, allocator arena, thread pools, tokenizer (measured on the tiny shape)
SCALE_BYTES = {"int4": 2 + 0.5, "int8": 4}  # per group (int4) / per output channel (int8)
GB = 1e9
MB = 1e6


@dataclass
class Shape:
    """What the planner needs to know about a model."""

    name: str
    matrix_params: int  # params of weight matrices (quantizable): projections, embeddings, lm_head
    other_params: int  # norms, biases: kept in float
    matrix_rows: int  # total output channels of all matrices (per-channel scales)
    n_layers: int
    d_model: int
    n_heads: int
    kv_heads: int
    head_dim: int
    ffn_hidden: int
    vocab_size: int
    context_len: int
    exact: bool = True  # False for a generic shape made up from a parameter count

    @property
    def params(self) -> int:
        return self.matrix_params + self.other_params


def shape_from_config(cfg: ModelConfig, name: str = "model") -> Shape:
    """Exact parameter counts of toolkit.model.Transformer for this config (tied weights counted once)."""
    d, hd, nh, nkv, f, V = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.kv_heads, cfg.ffn_hidden, cfg.vocab_size
    attn = [(nh * hd, d), (nkv * hd, d), (nkv * hd, d), (d, nh * hd)]  # q, k, v, o: (out, in)
    ffn = ([(f, d)] if cfg.ffn_type == "swiglu" else []) + [(f, d), (d, f)]
    experts = max(cfg.n_experts, 1)
    per_layer = attn + ffn * experts + ([(cfg.n_experts, d), (cfg.n_experts, d)] if cfg.n_experts else [])
    mats = per_layer * cfg.n_layers + [(V, d)] + ([] if cfg.tie_embeddings else [(V, d)])
    if cfg.pos_encoding == "learned":
        mats.append((cfg.context_len, d))
    norm = d * (2 if cfg.norm_type == "layernorm" else 1)
    other = cfg.n_layers * 2 * norm + (norm if cfg.norm_placement == "pre" else 0)
    if cfg.attn_bias:
        other += cfg.n_layers * (nh + 2 * nkv) * hd
    if cfg.proj_bias:
        other += cfg.n_layers * (d + (f * (2 if cfg.ffn_type == "swiglu" else 1) + d) * experts)
    return Shape(name, sum(o * i for o, i in mats), other, sum(o for o, _ in mats), cfg.n_layers, d, nh, nkv, hd,
                 f, V, cfg.context_len)


def generic_shape(params: float, vocab: int = 32000, context: int = 4096) -> Shape:
    """A llama-like shape with about `params` parameters: head_dim 128, n_layers = d_model / 128, SwiGLU
    with hidden 8/3 d_model, untied 32k-vocab embeddings (7e9 -> d_model 4096, 32 layers: Llama-2-7B).
    All parameters count as matrix weights, so weights = params x bits / 8 exactly."""
    if params <= 0:
        raise ConfigError(f"--params must be > 0 (got {params:g})")
    lo, hi = 1.0, 1e6  # solve 12 d^3 / 128 + 2 V d = params for d
    for _ in range(200):
        mid = (lo + hi) / 2
        if 12 * mid ** 3 / 128 + 2 * vocab * mid < params:
            lo = mid
        else:
            hi = mid
    d = max(128, int(round(lo / 128)) * 128)
    layers = max(1, d // 128)
    heads = d // 128
    ffn = int(round(8 * d / 3 / 256)) * 256
    return Shape(f"generic {params:.3g}-parameter llama-like", int(params), 0, int(params / d), layers, d, heads, heads, 128, ffn,
                 vocab, context, exact=False)


def shape_from_source(source: str) -> Shape:
    """A bundle folder (manifest.json), a checkpoint folder (config.json) or a recipe name / .toml."""
    path = Path(source)
    if (path / "manifest.json").is_file():
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        return shape_from_config(model_config_from_dict(manifest.get("model", {})), f"bundle {path}")
    if path.is_dir():
        from .config import read_json

        cfg_path = path / "config.json"
        if not cfg_path.is_file() and (path / "latest").is_file():  # a training run folder
            cfg_path = path / (path / "latest").read_text(encoding="utf-8").strip() / "config.json"
        meta = read_json(cfg_path, "checkpoint config")
        if "model" in meta and isinstance(meta["model"], dict):
            return shape_from_config(model_config_from_dict(meta["model"]), f"checkpoint {path}")
        return _hf_shape(meta, path)
    from .config import load_recipe

    recipe = load_recipe(source)
    return shape_from_config(recipe.model, f"recipe {recipe.name}")


def _hf_shape(meta: dict, path: Path) -> Shape:
    """A Hugging Face config.json (llama / qwen2 / gpt2 field names)."""
    get = lambda *keys, default=None: next((meta[k] for k in keys if k in meta), default)  # noqa: E731
    d, layers = get("hidden_size", "n_embd"), get("num_hidden_layers", "n_layer")
    heads, vocab = get("num_attention_heads", "n_head"), get("vocab_size")
    if not all(isinstance(v, int) for v in (d, layers, heads, vocab)):
        raise ConfigError(f"{path / 'config.json'} is neither a toolkit checkpoint config nor a Hugging Face one")
    cfg = ModelConfig(vocab_size=vocab, context_len=get("max_position_embeddings", "n_positions", default=2048),
                      d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=get("num_key_value_heads", default=0) or 0,
                      ffn_type="swiglu" if "intermediate_size" in meta else "gelu",
                      d_ff=get("intermediate_size", "n_inner", default=0) or 0,
                      tie_embeddings=bool(get("tie_word_embeddings", default=True)))
    return shape_from_config(cfg, f"Hugging Face model {path}")


@dataclass
class Estimate:
    precision: str
    weights: float  # as stored in the graph
    scales: float
    kv_cache: float  # one copy, at the graph's KV dtype
    activations: float  # one forward pass over `tokens` positions, at the compute precision
    overhead: float  # everything else in the peak: see the module docstring
    budget: float  # bytes; 0 = unknown
    detail: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.weights + self.scales + self.kv_cache + self.activations + self.overhead

    @property
    def fits(self) -> bool | None:
        return None if not self.budget else self.total <= self.budget

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(total=self.total, fits=self.fits)
        return d


def _weight_bytes(shape: Shape, precision: str) -> tuple[float, float]:
    p = PRECISIONS[precision]
    float_bytes = 2 if p.weight_bits == 16 else 4
    weights = shape.matrix_params * p.weight_bits / 8 + shape.other_params * float_bytes
    if p.group_size:
        scales = shape.matrix_params / p.group_size * SCALE_BYTES.get(precision, 2.5)
    elif p.weight_bits < 16:
        scales = (shape.matrix_rows or shape.matrix_params ** 0.5) * SCALE_BYTES["int8"]
    else:
        scales = 0.0
    return weights, scales


def estimate(shape: Shape, precision: str, context: int, batch: int = 1, budget: float = 0.0,
             compute: str | None = None, tokens: int | None = None) -> Estimate:
    """Peak memory of generating with `context` positions in `precision`.
    compute: what the device computes in (e.g. "fp32" for fp16 on an x86 CPU: weights upcast at load);
    tokens: positions of the largest forward pass (default: context; a static graph's window)."""
    for name in (precision, compute or precision):
        if name not in PRECISIONS:
            raise ConfigError(f"unknown precision {name!r} (known: {', '.join(PRECISIONS)})")
    if context < 1 or batch < 1:
        raise ConfigError(f"--context and --batch must be >= 1 (got {context}, {batch})")
    compute = compute or precision
    p, c = PRECISIONS[precision], PRECISIONS[compute]
    weights, scales = _weight_bytes(shape, precision)
    stored = weights + scales
    upcast = sum(_weight_bytes(shape, compute)) if compute != precision else 0.0
    kv = 2 * shape.n_layers * shape.kv_heads * shape.head_dim * context * batch * p.kv_bytes
    t = min(tokens or context, context)
    a = c.act_bytes
    acts = (batch * t * (shape.vocab_size + 4 * shape.d_model + 3 * shape.ffn_hidden) * a
            + batch * shape.n_heads * t * context * ATTN_COPIES * a)
    load = LOAD_FACTOR * stored + upcast + RUNTIME_BASE_BYTES
    generate = stored + upcast + KV_COPIES * kv + acts + RUNTIME_BASE_BYTES
    peak = max(load, generate)
    overhead = peak - (stored + kv + acts)
    return Estimate(precision, weights, scales, kv, acts, overhead, budget,
                    {"context": context, "batch": batch, "tokens_per_pass": t, "params": shape.params,
                     "compute": compute, "weight_bits": p.weight_bits, "kv_bytes": p.kv_bytes, "act_bytes": a,
                     "peak_phase": "load" if load > generate else "generate"})


def host_memory_bytes() -> float:
    """MemAvailable (Linux), else total physical memory, else 0 (unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0.0


def budget_bytes(target: Target) -> tuple[float, str]:
    if target.memory_budget_mb:
        return target.memory_budget_mb * 2 ** 20, f"{target.memory_budget_mb} MiB ({target.name} profile)"
    host = host_memory_bytes()
    return host, f"host memory available now ({host / GB:.1f} GB)" if host else "unknown"


def plan(shape: Shape, target: Target, context: int | None = None, batch: int = 1,
         precisions: list[str] | None = None) -> dict:
    """Estimates per precision (default: the target's; ["all"]: every known one, the target's marked)."""
    context = context or shape.context_len
    if shape.exact and context > shape.context_len:
        raise ConfigError(f"--context {context} exceeds the model's context window ({shape.context_len})")
    budget, budget_text = budget_bytes(target)
    names = list(PRECISIONS) if precisions == ["all"] else (precisions or list(target.precisions))
    rows = []
    tokens = (target.window or None) if target.static_shapes else None
    for name in names:
        e = estimate(shape, name, context, batch, budget, compute=target.compute_precision(name), tokens=tokens)
        row = e.to_dict()
        row["supported_by_target"] = name in target.precisions
        rows.append(row)
    fitting = [r["precision"] for r in rows if r["fits"] and r["supported_by_target"]]
    return {"model": shape.name, "params": shape.params, "exact_shape": shape.exact, "target": target.name,
            "context": context, "batch": batch, "budget_bytes": budget, "budget": budget_text, "rows": rows,
            "fits": fitting,
            "shape": {k: getattr(shape, k) for k in ("n_layers", "d_model", "n_heads", "kv_heads", "head_dim",
                                                     "ffn_hidden", "vocab_size", "context_len")}}


def _size(b: float) -> str:
    return f"{b / GB:8.2f} GB" if b >= GB else f"{b / MB:8.1f} MB"


def render(result: dict) -> str:
    s = result["shape"]
    lines = [f"{result['model']}: {result['params'] / 1e6:,.1f} M parameters; {s['n_layers']} layers, d_model "
             f"{s['d_model']}, {s['kv_heads']} KV heads x {s['head_dim']}, vocab {s['vocab_size']}",
             f"target {result['target']}: budget {result['budget']}; context {result['context']}, batch {result['batch']}",
             "",
             f"{'precision':10s} {'weights':>11s} {'scales':>11s} {'KV cache':>11s} {'activations':>11s} "
             f"{'overhead':>11s} {'total':>11s}  fits"]
    for r in result["rows"]:
        verdict = "-" if r["fits"] is None else ("yes" if r["fits"] else "NO")
        if not r["supported_by_target"]:
            verdict += f" (not a {result['target']} precision)"
        lines.append(f"{r['precision']:10s} {_size(r['weights'])} {_size(r['scales'])} {_size(r['kv_cache'])} "
                     f"{_size(r['activations'])} {_size(r['overhead'])} {_size(r['total'])}  {verdict}")
    lines.append("")
    if result["budget_bytes"]:
        lines.append(f"fits on {result['target']}: {', '.join(result['fits']) or 'none of its precisions'}")
    return "\n".join(lines)
