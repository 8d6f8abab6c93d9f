"""Fused decoder graphs for ONNX Runtime's CPU (and CUDA) execution provider, built from the weights.

The exported graph (toolkit/export.py) is what the dynamo exporter traces: ~70 primitive nodes per layer
(rms norm as Pow/ReduceMean/Sqrt/Reciprocal/Mul, rope as Split/Neg/Concat/Mul/Add, attention as
MatMul/Where/Softmax/MatMul, a Concat per KV tensor). A one-token decode step of a small model is then
dominated by per-node dispatch, not arithmetic. This module writes the same model as ~12 nodes per layer
of ONNX Runtime contrib operators:

    SkipSimplifiedLayerNormalization (residual add + RMSNorm)   | SkipLayerNormalization for layernorm
    MatMul (packed Q|K|V)                                       | MatMulNBits in int4 / int8 variants
    GroupQueryAttention (rotary from position_ids, causal, KV cache, padding as an additive bias)
    MatMul (o_proj), SkipSimplifiedLayerNormalization
    MatMul (packed gate|up), Split, Sigmoid, Mul, Mul, MatMul (down_proj)  | Gelu / Relu for other FFNs

and it follows the I/O contract of docs/architecture.md (same input and output names, shapes and dtypes)
plus three inputs derived from `attention_mask`, which `runtime.Session.feeds` computes (so `forward`
and the parity harness treat it like any other variant):
    attention_bias (B, 1, T, P+T) float: 0 for a real key, -1e4 (toolkit.model.MASK_VALUE) for a padded one
    seqlens_k (B,) int32 = P+T-1 for every row; total_sequence_length () int32 = P+T
(`attention_mask` itself stays an input, unused by the graph.) Two things GroupQueryAttention adds:
- shared KV buffers: when `past_key_values.i.*` and `present.i.*` are bound to the same preallocated
  (1, n_kv, C, hd) buffer, the kernel writes the new key/value in place (no per-step concatenation);
  the session's decode loop (toolkit/runtime/session.py) uses this for generation;
- limits: batch > 1 with both a past and more than one new token is refused by the kernel (the session
  runs such calls row by row); rotary inside the kernel needs head_dim % 16 == 0, otherwise explicit
  RotaryEmbedding nodes rotate q and k.
Masking: padding becomes an additive -1e4 bias on the scores; rows of padded *queries* (whose logits are
never used) may differ from PyTorch, which fills all-masked rows uniformly. Checks: `add_fused_variants`
refuses an fp32 graph more than FP32_MAX_ABS from PyTorch (`check_fused`); every variant still goes
through `edgekit parity` like any other.

Quantized variants (`precision="int4" | "int8"`) replace every MatMul with MatMulNBits (round-to-nearest,
symmetric, blocks of 32 along the input dimension, accuracy_level 4 = int8 activations on the CPU), the
recipe onnxruntime-genai's model builder uses on the CPU. A tied embedding table is then read from the
output head's quantized weights (GatherBlockQuantized), as onnxruntime-genai does; an untied one stays
float32 (Gather).

    edgekit optimize BUNDLE --precisions fp32,int8,int4     # adds fp32-fused, int8-fused, int4-fused (target cpu)

Supported: pre-norm (rmsnorm | layernorm), rope | learned | sinusoidal positions, swiglu | gelu |
gelu_tanh | relu feed-forward, any biases, dense (no mixture of experts). `problems(cfg)` lists why a
model is not.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from .errors import ExportError

GRAPH_FORMAT = "edgekit-fused/2"
DERIVED_INPUTS = ("attention_bias", "seqlens_k", "total_sequence_length")
FP32_MAX_ABS = 1e-4  # a fused fp32 graph must match PyTorch this closely (targets/cpu.toml fp32 max_abs_max)
QUANT_BITS = {"int4": 4, "int8": 8}


def problems(cfg) -> list[str]:
    """Why `cfg` cannot be written as a fused graph (empty: it can)."""
    p = []
    if cfg.norm_placement != "pre":
        p.append("post-norm blocks (the fused graph is pre-norm)")
    if cfg.n_experts:
        p.append("mixture-of-experts feed-forward")
    if cfg.ffn_type not in ("swiglu", "gelu", "gelu_tanh", "relu"):
        p.append(f"ffn_type {cfg.ffn_type!r}")
    return p


# --- graph building ------------------------------------------------------------------------------------
class _G:
    """A tiny graph builder: nodes, initializers and unique names."""

    def __init__(self):
        from onnx import helper

        self.h = helper
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str = "", outputs=None,
           **attrs) -> list[str]:
        base = name or op_type
        outs = outputs or [f"{base}/out{j}" if n_out > 1 else f"{base}/out" for j in range(n_out)]
        outs = [o if outputs else self.name(o) for o in outs]
        self.nodes.append(self.h.make_node(op_type, inputs, outs, name=self.name(base), domain=domain or None, **attrs))
        return outs

    def one(self, *args, **kwargs) -> str:
        return self.op(*args, **kwargs)[0]


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _rope_tables(cfg) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin caches (context_len, head_dim / 2), computed by the model's own rope code."""
    import torch

    from .model import rope_cos_sin

    cos, sin = rope_cos_sin(torch.arange(cfg.context_len)[None], cfg.head_dim, cfg.rope_theta)  # (1, 1, L, hd)
    half = cfg.head_dim // 2
    return _np(cos[0, 0, :, :half]), _np(sin[0, 0, :, :half])


def _sinusoidal_table(cfg) -> np.ndarray:
    import torch

    from .model import sinusoidal

    return _np(sinusoidal(torch.arange(cfg.context_len)[None], cfg.d_model)[0])


def build_graph(model, duplicate_head: bool = False, pack_gate_up: bool = True):
    """The fused fp32 ModelProto of a toolkit Transformer (see the module docstring).
    duplicate_head: a tied output head gets its own transposed copy (MatMul, quantizable) instead of
    Gemm(transB=1) on the embedding table."""
    from onnx import TensorProto as TP
    from onnx import helper

    cfg = model.cfg
    bad = problems(cfg)
    if bad:
        raise ExportError("this model has no fused graph: " + "; ".join(bad))
    sd = {k: v for k, v in model.state_dict().items()}
    g = _G()
    C, nh, nkv, hd, L = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.n_layers
    rms = cfg.norm_type == "rmsnorm"
    rotary_in_gqa = cfg.pos_encoding == "rope" and hd % 16 == 0

    # GroupQueryAttention's length inputs and the padding bias are graph inputs the runtime derives from
    # attention_mask (DERIVED_INPUTS): computing them in the graph took ~15 small nodes per call, ~10% of a
    # decode step of a 7M-parameter model (BENCHMARKS.md)
    seqlens_k, total_scalar, attn_bias = "seqlens_k", "total_sequence_length", "attention_bias"

    # embeddings
    x = g.one("Gather", [g.const("embed_tokens.weight", _np(sd["embed_tokens.weight"])), "input_ids"], name="embed")
    if cfg.pos_encoding == "learned":
        pos = g.one("Gather", [g.const("embed_positions.weight", _np(sd["embed_positions.weight"])), "position_ids"],
                    name="embed_pos")
        x = g.one("Add", [x, pos], name="add_pos")
    elif cfg.pos_encoding == "sinusoidal":
        pos = g.one("Gather", [g.const("sinusoidal_table", _sinusoidal_table(cfg)), "position_ids"], name="sin_pos")
        x = g.one("Add", [x, pos], name="add_pos")
    cos = sin = ""
    if cfg.pos_encoding == "rope":
        ct, st = _rope_tables(cfg)
        cos, sin = g.const("rope_cos", ct), g.const("rope_sin", st)

    def linear(inp, names, tag, bias_key="bias"):
        """MatMul with the row-stacked weights of `names` (one packed projection), + bias if any."""
        w = np.concatenate([_np(sd[f"{n}.weight"]) for n in names], axis=0).T  # (in, out)
        y = g.one("MatMul", [inp, g.const(f"{tag}.weight", w)], name=tag)
        biases = [sd.get(f"{n}.{bias_key}") for n in names]
        if any(b is not None for b in biases):
            b = np.concatenate([_np(b) for b in biases])
            y = g.one("Add", [y, g.const(f"{tag}.bias", b)], name=f"{tag}_bias")
        return y

    def norm(inp, prefix, skip=None):
        """(normed, residual sum) — the residual add is fused into the norm when skip is given."""
        gamma = g.const(f"{prefix}.weight", _np(sd[f"{prefix}.weight"]))
        beta = [] if rms else [g.const(f"{prefix}.bias", _np(sd[f"{prefix}.bias"]))]
        if skip is None:
            op = "SimplifiedLayerNormalization" if rms else "LayerNormalization"
            return g.one(op, [inp, gamma] + beta, name=prefix, axis=-1, epsilon=cfg.norm_eps), inp
        op = "SkipSimplifiedLayerNormalization" if rms else "SkipLayerNormalization"
        out = g.op(op, [inp, skip, gamma] + beta, n_out=4, domain="com.microsoft", name=prefix, epsilon=cfg.norm_eps)
        return out[0], out[3]

    residual, pending = x, None  # pending: the last block output not yet added to the residual stream
    for i in range(L):
        p = f"layers.{i}"
        h, residual = norm(residual if pending is None else pending, f"{p}.input_layernorm",
                           None if pending is None else residual)
        qkv = linear(h, [f"{p}.self_attn.{n}_proj" for n in "qkv"], f"{p}.self_attn.qkv_proj")
        gqa_in = [qkv, "", ""]
        attrs = {}
        if cfg.pos_encoding == "rope" and not rotary_in_gqa:  # rotate q and k with explicit nodes
            q, k, v = g.op("Split", [qkv, g.const(f"{p}.split_qkv", np.array([nh * hd, nkv * hd, nkv * hd], np.int64))],
                           n_out=3, name=f"{p}.split_qkv", axis=-1)
            q = g.one("RotaryEmbedding", [q, "position_ids", cos, sin], domain="com.microsoft", name=f"{p}.rope_q",
                      num_heads=nh)
            k = g.one("RotaryEmbedding", [k, "position_ids", cos, sin], domain="com.microsoft", name=f"{p}.rope_k",
                      num_heads=nkv)
            gqa_in = [q, k, v]
        rot = ["", "", ""]
        if rotary_in_gqa:
            rot = [cos, sin, "position_ids"]
            attrs["do_rotary"] = 1
        y = g.op("GroupQueryAttention",
                 gqa_in + [f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_scalar] + rot
                 + [attn_bias], domain="com.microsoft", name=f"{p}.self_attn",
                 outputs=[f"{p}.self_attn/out", f"present.{i}.key", f"present.{i}.value"],
                 num_heads=nh, kv_num_heads=nkv, **attrs)[0]
        o = linear(y, [f"{p}.self_attn.o_proj"], f"{p}.self_attn.o_proj")
        h2, residual = norm(o, f"{p}.post_attention_layernorm", residual)
        if cfg.ffn_type == "swiglu" and pack_gate_up:
            gu = linear(h2, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], f"{p}.mlp.gate_up_proj")
            F = cfg.ffn_hidden
            gate, up = g.op("Split", [gu, g.const(f"{p}.split_gu", np.array([F, F], np.int64))], n_out=2,
                            name=f"{p}.mlp.split", axis=-1)
            silu = g.one("Mul", [gate, g.one("Sigmoid", [gate], name=f"{p}.mlp.sigmoid")], name=f"{p}.mlp.silu")
            act = g.one("Mul", [silu, up], name=f"{p}.mlp.act")
        elif cfg.ffn_type == "swiglu":
            gate = linear(h2, [f"{p}.mlp.gate_proj"], f"{p}.mlp.gate_proj")
            up = linear(h2, [f"{p}.mlp.up_proj"], f"{p}.mlp.up_proj")
            silu = g.one("Mul", [gate, g.one("Sigmoid", [gate], name=f"{p}.mlp.sigmoid")], name=f"{p}.mlp.silu")
            act = g.one("Mul", [silu, up], name=f"{p}.mlp.act")
        else:
            up = linear(h2, [f"{p}.mlp.up_proj"], f"{p}.mlp.up_proj")
            if cfg.ffn_type == "relu":
                act = g.one("Relu", [up], name=f"{p}.mlp.act")
            else:  # exact erf GELU, or the tanh approximation (GPT-2's gelu_new)
                act = g.one("Gelu", [up], name=f"{p}.mlp.act",
                            approximate="tanh" if cfg.ffn_type == "gelu_tanh" else "none")
        pending = linear(act, [f"{p}.mlp.down_proj"], f"{p}.mlp.down_proj")
    final, _ = norm(pending, "norm", residual)
    head = _np(sd["lm_head.weight"])  # (V, C)
    if cfg.tie_embeddings and not duplicate_head:
        flat = g.one("Reshape", [final, g.const("c_flat", np.array([-1, C], np.int64))], name="flat")
        logits2 = g.one("Gemm", [flat, "embed_tokens.weight"], name="lm_head", transB=1)
        ids_shape = g.one("Shape", ["input_ids"], name="ids_shape")
        out_shape = g.one("Concat", [ids_shape, g.const("c_vocab", np.array([cfg.vocab_size], np.int64))],
                          name="logits_shape", axis=0)
        g.op("Reshape", [logits2, out_shape], name="logits_reshape", outputs=["logits"])
    else:
        g.op("MatMul", [final, g.const("lm_head.weight", head.T)], name="lm_head", outputs=["logits"])

    f, i64 = TP.FLOAT, TP.INT64
    kv = lambda n, length: helper.make_tensor_value_info(n, f, ["batch", nkv, length, hd])  # noqa: E731
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch", "past + seq"]),  # contract; unused
              helper.make_tensor_value_info("attention_bias", f, ["batch", 1, "seq", "past + seq"]),
              helper.make_tensor_value_info("seqlens_k", TP.INT32, ["batch"]),
              helper.make_tensor_value_info("total_sequence_length", TP.INT32, [])]
    outputs = [helper.make_tensor_value_info("logits", f, ["batch", "seq", cfg.vocab_size])]
    for i in range(L):
        inputs += [kv(f"past_key_values.{i}.key", "past"), kv(f"past_key_values.{i}.value", "past")]
        outputs += [kv(f"present.{i}.key", "past + seq"), kv(f"present.{i}.value", "past + seq")]
    graph = helper.make_graph(g.nodes, "edgekit-fused", inputs, outputs, initializer=g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="edgekit.fastgraph")
    proto.ir_version = 10
    return proto


def _save(proto, path: Path, external_data: bool):
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data:
        onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save(proto, str(path))


def quantize_graph(proto, bits: int, block_size: int = 32, symmetric: bool = True, accuracy_level: int = 4):
    """MatMulNBits (round-to-nearest) for every MatMul with a constant weight."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
                                          bits=bits, op_types_to_quantize=("MatMul",))
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        q = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level, algo_config=config)
        q.process()
    finally:
        logging.getLogger().setLevel(level)
    return q.model.model


def share_quantized_embedding(proto, cfg) -> bool:
    """Tied embeddings in a quantized graph: the token lookup reads the output head's MatMulNBits weights
    through GatherBlockQuantized (as onnxruntime-genai does) instead of a float32 copy of the table.
    Returns False (graph unchanged) when the head is not a MatMulNBits node."""
    from onnx import helper, numpy_helper

    g = proto.graph
    head = next((n for n in g.node if n.op_type == "MatMulNBits" and n.output[0] == "logits"), None)
    gather = next((n for n in g.node if n.op_type == "Gather" and n.input[1] == "input_ids"), None)
    if head is None or gather is None or gather.input[0] != "embed_tokens.weight":
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    bits, block = int(attrs["bits"]), int(attrs["block_size"])
    if len(head.input) > 3 and head.input[3]:  # asymmetric (zero points): keep the float table
        return False
    shape = lambda name, dims: g.initializer.append(numpy_helper.from_array(np.array(dims, np.int64), name))  # noqa: E731
    shape("embed_q_shape", [cfg.vocab_size, cfg.d_model * bits // 8])
    shape("embed_s_shape", [cfg.vocab_size, cfg.d_model // block])
    at = list(g.node).index(gather)
    new = [helper.make_node("Reshape", [head.input[1], "embed_q_shape"], ["embed_q"], name="embed_q_reshape"),
           helper.make_node("Reshape", [head.input[2], "embed_s_shape"], ["embed_s"], name="embed_s_reshape"),
           helper.make_node("GatherBlockQuantized", ["embed_q", "input_ids", "embed_s"], list(gather.output),
                            name="embed", domain="com.microsoft", bits=bits, block_size=block, gather_axis=0,
                            quantize_axis=1)]
    g.node.remove(gather)
    for j, node in enumerate(new):
        g.node.insert(at + j, node)
    keep = [t for t in g.initializer if t.name != "embed_tokens.weight"]
    del g.initializer[:]
    g.initializer.extend(keep)
    return True


def write_fused(model, path: str | Path, precision: str = "fp32", block_size: int = 32, accuracy_level: int = 4,
                external_data: bool | None = None, share_embedding: bool = True) -> Path:
    """Build the fused graph of `model` in `precision` (fp32 | int8 | int4) and save it to `path`."""
    path = Path(path)
    if precision == "fp32":
        proto = build_graph(model)
    elif precision in QUANT_BITS:
        proto = quantize_graph(build_graph(model, duplicate_head=True), QUANT_BITS[precision], block_size,
                               accuracy_level=accuracy_level)
        if model.cfg.tie_embeddings and share_embedding:
            share_quantized_embedding(proto, model.cfg)
    else:
        raise ExportError(f"no fused graph for precision {precision!r} (fp32, int8, int4)")
    if external_data is None:  # as toolkit/export.py: weights above 1.5 GB go to a .data file
        external_data = sum(t.ByteSize() for t in proto.graph.initializer) > 1_500_000_000
    _save(proto, path, external_data)
    return path


def check_fused(model, path: str | Path, seq: int = 8) -> float:
    """Max |logits| difference between PyTorch and the fused graph run by the runtime (ONNX Runtime CPU,
    which computes the derived inputs) on a prefill and one cached step (as export.check_against_torch)."""
    import torch

    from .runtime.session import load_model_file

    cfg = model.cfg
    session = load_model_file(path, cfg, "cpu", "fp32")
    seq = max(1, min(seq, cfg.context_len - 1))
    ids = torch.randint(0, cfg.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(1))
    worst, past, ours = 0.0, None, None
    with torch.no_grad():
        for chunk in (ids[:, :seq], ids[:, seq:]):
            ref = model(chunk, past_key_values=past)
            logits, ours = session.forward(chunk.numpy(), ours)
            if not np.isfinite(logits).all():
                return float("inf")
            worst = max(worst, float(np.abs(logits - ref.logits.numpy()).max()))
            past = ref.present
    return worst


# --- bundle variants -------------------------------------------------------------------------------------
def variant_name(precision: str) -> str:
    return f"{precision}-fused"


def add_fused_variants(bundle_path, precisions=("fp32", "int4"), reference=None, block_size: int = 32,
                       accuracy_level: int = 4, log=print) -> list[dict]:
    """Add `<precision>-fused` variants (target cpu) to a bundle. The reference checkpoint is the one
    the manifest names (hash-checked, as parity does) or `reference`. The fp32 graph is refused unless
    its logits match PyTorch within FP32_MAX_ABS on a prefill and a cached step."""
    from .bundle import Bundle
    from .parity import load_reference

    bundle = Bundle.open(bundle_path)
    model, _, info = load_reference(bundle, reference)
    bad = problems(model.cfg)
    if bad:
        raise ExportError(f"bundle {bundle.root}: no fused graph for this model: " + "; ".join(bad))
    results = []
    for precision in precisions:
        name = variant_name(precision)
        work = bundle.root / f".tmp-fuse-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        try:
            t0 = time.perf_counter()
            built = write_fused(model, work / "model.onnx", precision, block_size, accuracy_level)
            seconds = time.perf_counter() - t0
            err = check_fused(model, built)
            if precision == "fp32" and not err <= FP32_MAX_ABS:
                raise ExportError(f"the fused fp32 graph differs from PyTorch by {err:.3g} > {FP32_MAX_ABS}")
            if not np.isfinite(err):
                raise ExportError(f"the fused {precision} graph produces non-finite logits")
            final = bundle.root / name
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        files = sorted(p.relative_to(bundle.root).as_posix() for p in final.iterdir() if p.is_file())
        export = {"graph": GRAPH_FORMAT, "fused": True, "builder": "toolkit.fastgraph", "seconds": round(seconds, 3),
                  "check_max_abs": err, "shared_kv": True}
        quant = None
        if precision in QUANT_BITS:
            quant = {"method": "matmulnbits-rtn", "bits": QUANT_BITS[precision], "group_size": block_size,
                     "symmetric": True, "accuracy_level": accuracy_level,
                     "embedding": ("the output head's quantized table (GatherBlockQuantized)" if model.cfg.tie_embeddings
                                   else "fp32"),
                     "description": "MatMulNBits round-to-nearest on the fused graph (onnxruntime-genai's CPU recipe)"}
        bundle.add_variant(name, precision, files, ["cpu"], f"{name}/model.onnx", quantization=quant, export=export)
        size = sum(bundle.manifest["files"][f]["bytes"] for f in files)
        results.append({"variant": name, "precision": precision, "max_abs_vs_pytorch": err, "bytes": size,
                        "seconds": round(seconds, 3)})
        log(f"  {name:12s} {size / 1e6:8.2f} MB  max |logits - PyTorch| {err:.2e}  ({seconds:.1f} s)")
    return results
