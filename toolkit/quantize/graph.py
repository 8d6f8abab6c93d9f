"""ONNX graph helpers for quantization: the weight-layer inventory of the fp32 graph, untying a tied output
head, and the report of which layers a quantized graph left in floating point (and why).

Layer names come from the dynamo exporter's `pkg.torch.onnx.name_scopes` node metadata, so a layer is
named as the PyTorch module it came from (`layers.0.self_attn.q_proj`, `lm_head`, `embed_tokens`); a graph
without that metadata falls back to ONNX node names.

Every MatMul / Gemm / Gather of the fp32 graph is listed, including the ones with no constant weight
(attention scores and values: activation x activation products) and the index Gathers of shape
arithmetic, so the report accounts for every such node ("nothing skipped silently").
"""

from __future__ import annotations

import ast
from pathlib import Path
import fnmatch
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import QuantizationError

WEIGHT_OPS = ("MatMul", "Gemm", "Gather")
FLOAT_TYPES = (1, 10, 11, 16)  # onnx TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16
UNTIED_SUFFIX = ".untied_T"


@dataclass
class Layer:
    node: str  # ONNX node name in the fp32 graph
    op: str  # MatMul | Gemm | Gather
    name: str  # module path, e.g. layers.0.mlp.down_proj (or the node name)
    kind: str  # linear | lm_head | embedding | activation-matmul | index-gather
    weight: str | None  # constant weight initializer (None: no constant weight)
    shape: tuple[int, ...] | None  # weight shape: (K, N) for MatMul, (rows, cols) for Gather
    tied: bool = False  # weight is computed from another layer's table (Transpose of the embedding)
    output: str = ""  # first output tensor name (OpenVINO keeps it as a tensor name)

    @property
    def params(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape) if self.shape else None
        return d


def _module(node) -> str | None:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None
            mods = [s for s in scopes if s.startswith("model.")]
            if mods:
                return mods[-1][len("model."):] if mods[-1] != "model.model" else "model"
    return None


def _initializers(graph) -> dict:
    return {t.name: t for t in graph.initializer}


def _producers(graph) -> dict:
    return {o: n for n in graph.node for o in n.output}


def inventory(model) -> list[Layer]:
    """Every MatMul / Gemm / Gather of an fp32 ONNX ModelProto, classified."""
    graph = model.graph
    inits, prod = _initializers(graph), _producers(graph)
    outputs = {o.name for o in graph.output}
    layers = []
    for node in graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        module = _module(node)
        w_idx = 0 if node.op_type == "Gather" else 1
        wname = node.input[w_idx] if len(node.input) > w_idx else ""
        weight, shape, tied = None, None, False
        if wname in inits and inits[wname].data_type in FLOAT_TYPES:
            weight, shape = wname, tuple(int(d) for d in inits[wname].dims)
        elif wname in prod and prod[wname].op_type == "Transpose" and prod[wname].input[0] in inits:
            src = inits[prod[wname].input[0]]
            if src.data_type in FLOAT_TYPES and len(src.dims) == 2:
                weight, shape, tied = src.name, (int(src.dims[1]), int(src.dims[0])), True
        if node.op_type == "Gather":
            kind = "embedding" if weight else "index-gather"
        elif weight is None:
            kind = "activation-matmul"
        elif (module or "").split(".")[-1] == "lm_head" or node.output[0] in outputs and "logits" in node.output[0]:
            kind = "lm_head"
        else:
            kind = "linear"
        name = module or node.name
        if kind == "activation-matmul":
            name = f"{module}/{node.name}" if module else node.name
        elif kind == "index-gather":
            name = node.name
        layers.append(Layer(node.name, node.op_type, name, kind, weight, shape, tied, node.output[0]))
    return layers


def weight_layers(layers: list[Layer]) -> list[Layer]:
    return [l for l in layers if l.kind in ("linear", "lm_head", "embedding")]


def resolve_keep(patterns: list[str], layers: list[Layer], n_layers: int) -> dict[str, str]:
    """Layer patterns the user wants kept in float -> {node name: pattern}. Aliases: `first` and `last`
    (every layer of the first / last block), `lm_head`, `embed_tokens`; otherwise fnmatch patterns over
    module names (e.g. `layers.*.mlp.down_proj`). A pattern that matches nothing is an error."""
    aliases = {"first": "layers.0.*", "last": f"layers.{n_layers - 1}.*", "embeddings": "embed_tokens"}
    chosen: dict[str, str] = {}
    bad = []
    for pat in patterns:
        glob = aliases.get(pat, pat)
        hit = [l for l in weight_layers(layers) if fnmatch.fnmatchcase(l.name, glob) or l.node == pat]
        if not hit:
            bad.append(pat)
        for l in hit:
            chosen.setdefault(l.node, pat)
    if bad:
        names = ", ".join(l.name for l in weight_layers(layers))
        raise QuantizationError(f"--keep-float {', '.join(bad)} matches no weight layer; layers: {names}; "
                                "aliases: first, last, lm_head, embed_tokens")
    return chosen


def untie(model, layers: list[Layer], skip: set[str] = frozenset()) -> list[str]:
    """Give every tied MatMul (B = Transpose(table)) its own constant B = table.T, so weight quantizers see
    a constant weight; drop Transposes nobody uses any more. Returns the node names untied."""
    from onnx import numpy_helper

    graph = model.graph
    inits = _initializers(graph)
    done = []
    for layer in layers:
        if not layer.tied or layer.node in skip:
            continue
        node = next(n for n in graph.node if n.name == layer.node)
        table = numpy_helper.to_array(inits[layer.weight])
        name = layer.weight + UNTIED_SUFFIX
        if name not in inits:
            t = numpy_helper.from_array(np.ascontiguousarray(table.T), name)
            graph.initializer.append(t)
            inits[name] = t
        node.input[1] = name
        done.append(layer.node)
    prune(model)
    return done


def prune(model):
    """Remove nodes whose outputs nobody uses and initializers nobody reads."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | outputs
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


# --- what a quantized ONNX graph left in float ---------------------------------------------------------
def _dq_input(name: str, prod: dict, inits: dict) -> bool:
    """Is this tensor a dequantized (integer) weight: DequantizeLinear output, maybe through Transpose /
    Reshape, or an integer initializer?"""
    seen = 0
    while name in prod and seen < 4:
        n = prod[name]
        if n.op_type == "DequantizeLinear":
            return True
        if n.op_type not in ("Transpose", "Reshape", "Cast", "Identity"):
            return False
        name, seen = n.input[0], seen + 1
    return name in inits and inits[name].data_type not in FLOAT_TYPES


def onnx_status(qmodel, layers: list[Layer]) -> dict[str, dict]:
    """{fp32 node name: {"quantized": bool, "as": op or format, ...}} for every layer of the inventory."""
    graph = qmodel.graph
    inits, prod = _initializers(graph), _producers(graph)
    by_name = {n.name: n for n in graph.node}
    by_output = {o: n for n in graph.node for o in n.output if o}
    status = {}
    for layer in layers:
        node = by_name.get(layer.node)
        if node is not None and node.op_type == layer.op:
            w_idx = 0 if node.op_type == "Gather" else 1
            q = len(node.input) > w_idx and _dq_input(node.input[w_idx], prod, inits)
            if not q and layer.op == "MatMul" and len(node.input) > 0 and layer.kind == "activation-matmul":
                q = _dq_input(node.input[0], prod, inits) and _dq_input(node.input[1], prod, inits)
            status[layer.node] = {"quantized": bool(q), "as": f"QDQ {layer.op}" if q else layer.op}
            continue
        # replaced: find the node now producing the layer's output (through a trailing DequantizeLinear)
        new = by_output.get(layer.output)
        if new is not None and new.op_type == "DequantizeLinear" and new.input[0] in by_output:
            new = by_output[new.input[0]]
        if new is not None and new.op_type == "Reshape" and new.input[0] in by_output:  # N-D output reshape
            new = by_output[new.input[0]]
        op = new.op_type if new is not None else "?"
        attrs = {}
        if new is not None:
            for a in new.attribute:
                if a.name in ("bits", "block_size", "accuracy_level"):
                    attrs[a.name] = int(a.i)
        status[layer.node] = {"quantized": op != layer.op, "as": op, **attrs}
    return status


def float_reason(layer: Layer, kept: dict[str, str], method_note: dict[str, str]) -> str:
    """Why a layer stayed in floating point (the caller lists it with this reason)."""
    if layer.node in kept:
        return f"excluded by request (--keep-float {kept[layer.node]})"
    if layer.node in method_note:
        return method_note[layer.node]
    if layer.kind == "activation-matmul":
        return "no constant weight (attention: activation x activation); weight-only methods leave it in float"
    if layer.kind == "index-gather":
        return "gathers integer indices / shapes, not a weight table"
    if layer.tied:
        return "weight is computed (Transpose of the tied embedding table), not a constant"
    return "left in float by the quantizer without a stated reason"


def layer_report(layers: list[Layer], status: dict[str, dict], kept: dict[str, str],
                 method_note: dict[str, str] | None = None) -> dict:
    """The manifest's layer record: quantized layers (how), float layers (why), parameter counts."""
    method_note = method_note or {}
    quantized, floating = [], []
    for layer in layers:
        st = status.get(layer.node, {"quantized": False, "as": "?"})
        entry = {"layer": layer.name, "node": layer.node, "op": layer.op,
                 "shape": list(layer.shape) if layer.shape else None}
        if st["quantized"]:
            quantized.append({**entry, **{k: v for k, v in st.items() if k != "quantized"}})
        else:
            floating.append({**entry, "reason": float_reason(layer, kept, method_note)})
    wparams = sum(l.params for l in weight_layers(layers))
    qparams = sum(l.params for l in weight_layers(layers) if status.get(l.node, {}).get("quantized"))
    return {"quantized_layers": quantized, "float_layers": floating,
            "weight_params": wparams, "quantized_weight_params": qparams,
            "quantized_fraction": round(qparams / wparams, 4) if wparams else 0.0}


def format_report(report: dict) -> list[str]:
    """Printable lines: float weight layers one per line with their reason, grouped lines for the rest."""
    lines = []
    q = report["quantized_layers"]
    lines.append(f"quantized: {len(q)} layers, {report['quantized_weight_params']:,} of "
                 f"{report['weight_params']:,} weight parameters ({100 * report['quantized_fraction']:.1f}%)")
    floats = report["float_layers"]
    weights = [f for f in floats if f["shape"] is not None]
    others = [f for f in floats if f["shape"] is None]
    lines.append(f"left in floating point: {len(weights)} weight layers, {len(others)} weightless MatMul/Gather nodes")
    for f in weights:
        lines.append(f"  {f['layer']:36s} {f['op']:7s} {'x'.join(map(str, f['shape'])):>11s}  {f['reason']}")
    by_reason: dict[str, list[str]] = {}
    for f in others:
        by_reason.setdefault(f["reason"], []).append(f["node"])
    for reason, nodes in by_reason.items():
        lines.append(f"  {len(nodes)} nodes ({', '.join(nodes[:4])}{', ...' if len(nodes) > 4 else ''}): {reason}")
    return lines


def finish(job, qmodel_path, record: dict, notes: dict[str, str] | None = None):
    """Output for a quantized ONNX file in job.work: checks it, adds the layer report to the record."""
    import onnx

    from . import Output

    _, layers, kept, _ = job.prepared()
    qmodel = onnx.load(str(qmodel_path), load_external_data=False)
    try:
        onnx.checker.check_model(qmodel)
    except Exception as exc:  # contrib ops are not checked by onnx; a real structural problem is
        if "com.microsoft" not in str(exc):
            raise QuantizationError(f"the quantized graph fails the ONNX checker: {(str(exc).splitlines() or [''])[0]}") from None
    status = onnx_status(qmodel, layers)
    report = layer_report(layers, status, kept, notes)
    record = {**record, "layers": report, "kept_float_request": sorted(set(kept.values())),
              "untied": job._prepared.get("untied", [])}
    files = [Path(qmodel_path)] + [Path(qmodel_path).parent / loc for loc in _external(qmodel)]
    return Output(files=files, model=Path(qmodel_path), record=record, report_lines=format_report(report))


def _external(model) -> list[str]:
    locs = set()
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                locs.add(e.value)
    return sorted(locs)
