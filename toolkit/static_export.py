"""Static-shape graph pairs for NPUs (QNN HTP, Intel NPU): no dynamic dimension anywhere in the graph.

A dynamic KV-cache graph (toolkit/export.py) grows its cache by one position per step; NPU compilers want
every shape fixed at compile time. So the model is exported twice, with fixed shapes, and the host keeps
the cache (toolkit/runtime/static.py):

prefill  over a fixed window of W positions
    inputs   input_ids (1, W) int64, position_ids (1, W) int64, attention_mask (1, W) int64 (1 = real token;
             right padding: prompt in slots 0..n-1, or left padding: prompt in slots W-n..W-1)
    outputs  logits (1, W, vocab), present.{i}.key / .value (1, n_kv, C, hd): slot j < W holds position
             j's key/value, slots W..C-1 are zeros — the fixed-size cache, ready to feed to decode

decode   one token over a fixed-size cache of C slots
    inputs   input_ids (1, 1), position_ids (1, 1), attention_mask (1, C + 1) int64 (entries 0..C-1 mark
             the valid cache slots, entry C the new token itself, always 1),
             past_key_values.{i}.key / .value (1, n_kv, C, hd)
    outputs  logits (1, 1, vocab), new.{i}.key / .value (1, n_kv, 1, hd): the new position's key/value,
             which the host writes into the next free slot

Both graphs come from the same `Transformer.forward` as the dynamic export (so the I/O semantics match
the PyTorch reference), with the finite mask constant toolkit.model.MASK_VALUE (-1e4; QNN rejects -inf).
Then two graph rewrites for NPU compilers, exact in float arithmetic:
- a Transpose of a constant (the tied lm_head reuses the embedding matrix transposed) becomes a
  transposed constant, so the MatMul sees a weight (QNN HTP has no 16-bit x 16-bit FullyConnected);
- Mul(x, Reciprocal(y)) becomes Div(x, y): QNN HTP's 16-bit Reciprocal (QNN 2.51) returns wrong values,
  which broke RMSNorm (x * rsqrt(mean(x^2) + eps)) on the NPU while the same QDQ graph was right on CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError, ExportError
from .model import Transformer

OPSET = 21  # 16-bit QuantizeLinear / DequantizeLinear are standard from opset 21


@dataclass(frozen=True)
class StaticShape:
    window: int  # W: prefill positions
    cache: int  # C: KV-cache slots (prompt + generated tokens)

    def check(self, context_len: int):
        problems = []
        if self.window < 1:
            problems.append(f"window must be >= 1 (got {self.window})")
        if self.cache <= self.window:
            problems.append(f"cache ({self.cache}) must be larger than window ({self.window})")
        if self.cache > context_len:
            problems.append(f"cache ({self.cache}) exceeds the model's context ({context_len} positions)")
        if problems:
            raise ConfigError("static shape: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def default_shape(context_len: int, window: int = 0, cache: int = 0) -> StaticShape:
    """Window and cache from the arguments (0 = default: cache = context, window = cache / 4)."""
    cache = cache or context_len
    window = window or max(1, min(64, cache // 4))
    return StaticShape(window, cache).check(context_len)


def prefill_names(n_layers: int) -> tuple[list[str], list[str]]:
    return (["input_ids", "position_ids", "attention_mask"],
            ["logits"] + [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")])


def decode_names(n_layers: int) -> tuple[list[str], list[str]]:
    return (["input_ids", "position_ids", "attention_mask"]
            + [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")],
            ["logits"] + [f"new.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")])


class StaticPrefill(nn.Module):
    def __init__(self, model: Transformer, shape: StaticShape):
        super().__init__()
        self.model, self.pad = model, shape.cache - shape.window

    def forward(self, input_ids, position_ids, attention_mask):
        out = self.model(input_ids, position_ids=position_ids, attention_mask=attention_mask)
        flat = [out.logits]  # (1, W, vocab)
        for k, v in out.present:  # (1, n_kv, W, hd) -> (1, n_kv, C, hd), zeros after the window
            flat += [F.pad(k, (0, 0, 0, self.pad)), F.pad(v, (0, 0, 0, self.pad))]
        return tuple(flat)


class StaticDecode(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, *past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        out = self.model(input_ids, position_ids=position_ids, attention_mask=attention_mask, past_key_values=pairs)
        flat = [out.logits]  # (1, 1, vocab)
        for k, v in out.present:  # (1, n_kv, C + 1, hd): keep the new position only
            flat += [k[:, :, -1:, :], v[:, :, -1:, :]]
        return tuple(flat)


def example_prefill(cfg, shape: StaticShape):
    W = shape.window
    return (torch.zeros(1, W, dtype=torch.long), torch.arange(W).unsqueeze(0), torch.ones(1, W, dtype=torch.long))


def example_decode(cfg, shape: StaticShape):
    C = shape.cache
    past = [torch.zeros(1, cfg.kv_heads, C, cfg.head_dim) for _ in range(2 * cfg.n_layers)]
    return (torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), shape.window, dtype=torch.long),
            torch.ones(1, C + 1, dtype=torch.long), *past)


# --- graph rewrites --------------------------------------------------------------------------------------
def fold_constant_transposes(model) -> int:
    """Transpose(initializer) -> a transposed initializer. Returns the number folded."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    keep, folded = [], 0
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
            arr = numpy_helper.to_array(inits[node.input[0]])
            arr = arr.transpose(perm[0]) if perm else arr.T
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), node.output[0]))
            folded += 1
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return folded


def reciprocal_mul_to_div(model) -> int:
    """Mul(x, Reciprocal(y)) -> Div(x, y) when every consumer of the Reciprocal is a Mul."""
    from onnx import helper

    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    drop, replace = set(), {}
    for node in model.graph.node:
        if node.op_type != "Reciprocal" or node.output[0] in graph_outputs:
            continue
        users = consumers.get(node.output[0], [])
        if not users or any(u.op_type != "Mul" or list(u.input).count(node.output[0]) != 1 for u in users):
            continue
        drop.add(id(node))
        for u in users:
            other = u.input[1] if u.input[0] == node.output[0] else u.input[0]
            div = helper.make_node("Div", [other, node.input[0]], list(u.output), name=f"{u.name}_div")
            div.metadata_props.extend(u.metadata_props)  # keep the module scope (first-divergence search)
            replace[id(u)] = div
    nodes = [replace.get(id(n), n) for n in model.graph.node if id(n) not in drop]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return len(replace)


def static_problems(model) -> list[str]:
    """Why a graph is not NPU-ready: a dynamic input/output dimension, a non-finite constant."""
    from onnx import numpy_helper

    problems = []
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for v in values:
            dims = v.type.tensor_type.shape.dim
            if any(not d.HasField("dim_value") for d in dims):
                shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
                problems.append(f"{kind} {v.name} has a dynamic shape {shape}")
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                              for a in n.attribute if a.name == "value"]
    for t in tensors:
        arr = numpy_helper.to_array(t)
        if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
            problems.append(f"constant {t.name or '(unnamed)'} holds inf/nan (NPUs need finite mask values)")
    return problems


# --- export ----------------------------------------------------------------------------------------------
def _export(module: nn.Module, args, path: Path, names: tuple[list[str], list[str]]):
    from .export import _quiet_exporter

    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(module, args, dynamo=True, input_names=names[0], output_names=names[1],
                                        opset_version=OPSET, verbose=False)
            program.save(str(path))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"static ONNX export failed: {type(exc).__name__}: {first}") from exc


def export_static(model: Transformer, out_dir: str | Path, shape: StaticShape) -> dict:
    """Write prefill.onnx and decode.onnx (float32, static shapes) into out_dir; returns
    {"prefill": path, "decode": path, "rewrites": {...}}. Raises ExportError if a graph is not static."""
    import onnx

    cfg = model.cfg
    shape.check(cfg.context_len)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    result, rewrites = {}, {}
    jobs = (("prefill", StaticPrefill(model, shape), example_prefill(cfg, shape), prefill_names(cfg.n_layers)),
            ("decode", StaticDecode(model), example_decode(cfg, shape), decode_names(cfg.n_layers)))
    for name, module, args, names in jobs:
        path = out / f"{name}.onnx"
        _export(module, args, path, names)
        graph = onnx.load(str(path))
        rewrites[name] = {"constant_transposes_folded": fold_constant_transposes(graph),
                          "reciprocal_mul_to_div": reciprocal_mul_to_div(graph)}
        problems = static_problems(graph)
        if problems:
            raise ExportError(f"the static {name} graph is not NPU-ready: " + "; ".join(problems))
        onnx.checker.check_model(graph)
        onnx.save(graph, str(path))
        result[name] = path
    result["rewrites"] = rewrites
    return result


def check_against_torch(model: Transformer, paths: dict, shape: StaticShape, n: int | None = None, seed: int = 0) -> float:
    """Max |logits| difference of the float static pair (ONNX Runtime CPU) against PyTorch over a prompt of
    n tokens (default W - 1 ... at least 1) followed by decode steps up to the window + 4 positions."""
    import onnxruntime as ort

    cfg = model.cfg
    W, C = shape.window, shape.cache
    n = n or max(1, W - 1)
    rng = np.random.default_rng(seed)
    total = min(C, n + 4)
    ids = rng.integers(0, cfg.vocab_size, total)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids[None])).logits[0].numpy()  # (total, vocab)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    pre = ort.InferenceSession(str(paths["prefill"]), so, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(paths["decode"]), so, providers=["CPUExecutionProvider"])
    x = np.zeros((1, W), np.int64)
    x[0, :n] = ids[:n]
    pos = np.zeros((1, W), np.int64)
    pos[0, :n] = np.arange(n)
    mask = np.zeros((1, W), np.int64)
    mask[0, :n] = 1
    outs = pre.run(None, {"input_ids": x, "position_ids": pos, "attention_mask": mask})
    worst = float(np.abs(outs[0][0, :n] - ref[:n]).max())
    cache = [o.copy() for o in outs[1:]]
    cmask = np.zeros((1, C + 1), np.int64)
    cmask[0, :n] = 1
    cmask[0, C] = 1
    for p in range(n, total):
        feed = {"input_ids": ids[p:p + 1][None], "position_ids": np.array([[p]], np.int64), "attention_mask": cmask}
        for i in range(cfg.n_layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = cache[2 * i], cache[2 * i + 1]
        o = dec.run(None, feed)
        worst = max(worst, float(np.abs(o[0][0, 0] - ref[p]).max()))
        for i in range(cfg.n_layers):
            cache[2 * i][:, :, p:p + 1], cache[2 * i + 1][:, :, p:p + 1] = o[1 + 2 * i], o[2 + 2 * i]
        cmask[0, p] = 1
    return worst
