"""First divergence: which layer's hidden state is the first to leave tolerance.

Method 1, graph surgery (any variant: fp32, fp16, quantized). The dynamo exporter stamps every ONNX node
with the PyTorch module scopes it came from (metadata `pkg.torch.onnx.name_scopes`, e.g.
['', 'layers.1', 'layers.1.mlp']). A block's output is the (B, T, d_model) float tensor that a node in
`layers.i` produces and a node outside `layers.i` consumes; the embeddings (hidden state 0) are the
(B, T, d_model) tensor produced outside every block and consumed by `layers.0`. Nodes added after export
(quantizers, casts) carry no scope and inherit the scope of their first input's producer. Those tensors are
added as extra graph outputs, one teacher-forced window runs on the target (through toolkit.runtime), and each
is compared with the PyTorch reference's `hidden_states`. Static NPU variants (QDQ pairs on qnn-htp): the
same surgery on the prefill graph, run with the generation session's single-EP settings (nothing on the
CPU), the window's first positions compared (`locate_static`). OpenVINO IR variants: OpenVINO keeps the
ONNX tensor names, so the block outputs found in the source ONNX graph are added to the IR
(`Model.add_outputs`) and run with the variant's compile settings (`locate_ir`).

Method 2, debug export (fp32 only, when the graph carries no scopes): re-export the reference with
`export_onnx(..., debug_hidden=True)` and run it on the target: that localises exporter or
runtime faults. Otherwise the result is "n/a" with the reason.

Error per hidden state: relative L2 error ||h - h_ref|| / ||h_ref|| over the window, and the max abs error.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np

from .parity_metrics import DEFAULT_HIDDEN_REL_ERR, FALLBACK_HIDDEN_REL_ERR

LAYER_SCOPE = re.compile(r"(?:^|\.)layers\.(\d+)$")
TOP = -1  # scope of nodes outside every block


def _node_layer(node) -> int | None:
    """Block index from the exporter's scope metadata; TOP when scoped but outside blocks; None if unscoped."""
    md = {p.key: p.value for p in node.metadata_props}
    scopes = md.get("pkg.torch.onnx.name_scopes")
    if scopes is not None:
        names = [s.strip().strip("'\"") for s in scopes.strip("[]").split(",")]
    elif "namespace" in md:
        names = [seg.split(":")[0].strip() for seg in md["namespace"].split("/")]
    else:
        return None
    for name in names:
        m = LAYER_SCOPE.search(name)
        if m:
            return int(m.group(1))
    return TOP


def block_output_candidates(graph, n_layers: int) -> dict[int, list[str]]:
    """hidden-state index j (0 = embeddings, i+1 = output of block i) -> candidate tensor names, in
    production order. Empty when the graph carries no scope metadata."""
    producer_scope: dict[str, int] = {}
    scopes = []
    any_scoped = False
    for node in graph.node:
        scope = _node_layer(node)
        any_scoped |= scope is not None
        if scope is None:  # inserted after export: inherit from the first input's producer
            scope = next((producer_scope[i] for i in node.input if i in producer_scope), TOP)
        scopes.append(scope)
        for out in node.output:
            producer_scope[out] = scope
    if not any_scoped:
        return {}
    found: dict[int, list[str]] = {}
    for node, scope in zip(graph.node, scopes):
        for name in node.input:
            src = producer_scope.get(name)
            if src is None or src == scope:
                continue
            if src >= 0 and scope != src:  # leaves block src
                j = src + 1
            elif src == TOP and scope == 0:  # enters block 0 from outside
                j = 0
            else:
                continue
            if name not in found.setdefault(j, []):
                found[j].append(name)
    return {j: v for j, v in found.items() if j <= n_layers}


def _run_graph(path: Path, cfg, target, precision: str, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of the graph at `path` for one no-cache forward of ids (1, T), on the target."""
    from .runtime import load_model_file

    session = load_model_file(path, cfg, target, precision)
    return session.run(session.feeds(ids))


def _compare(ref_hidden: list[np.ndarray], cand: dict[int, np.ndarray], ref_logits, cand_logits, tol: float) -> dict:
    per_layer, first = [], None
    for j, ref in enumerate(ref_hidden):
        if j not in cand:
            per_layer.append({"hidden_state": j, "rel_err": None, "max_abs": None})
            continue
        h = cand[j].astype(np.float64)
        r = ref.astype(np.float64)
        diff = h - r
        rel = float(np.linalg.norm(diff) / max(np.linalg.norm(r), 1e-30)) if np.isfinite(h).all() else float("inf")
        entry = {"hidden_state": j, "rel_err": rel, "max_abs": float(np.max(np.abs(diff)))}
        per_layer.append(entry)
        if first is None and not rel <= tol:
            first = entry
    head = None
    if ref_logits is not None and cand_logits is not None:
        d = cand_logits.astype(np.float64) - ref_logits.astype(np.float64)
        rel = float(np.linalg.norm(d) / max(np.linalg.norm(ref_logits), 1e-30)) if np.isfinite(d).all() else float("inf")
        head = {"rel_err": rel, "max_abs": float(np.max(np.abs(d)))}
    for e in per_layer:  # JSON: infinity as null
        for k in ("rel_err", "max_abs"):
            if e[k] is not None and not np.isfinite(e[k]):
                e[k] = None
    out = {"tolerance": tol, "per_layer": per_layer, "logits": head, "largest_jump": None}
    errs = [e["rel_err"] for e in per_layer]
    jumps = [(b - a, j) for j, (a, b) in enumerate(zip(errs, errs[1:]), 1) if a is not None and b is not None]
    if jumps:  # for quantized variants, where every layer adds a little: the block that adds the most
        inc, j = max(jumps)
        out["largest_jump"] = {"layer": j - 1, "hidden_state": j, "increase": inc}
    if first is not None:
        j = first["hidden_state"]
        where = "embeddings (hidden state 0)" if j == 0 else f"output of block {j - 1} (layers.{j - 1}, hidden state {j})"
        out.update(status="found", layer=None if j == 0 else j - 1, hidden_state=j, where=where,
                   rel_err=first["rel_err"], max_abs=first["max_abs"])
    elif head is not None and not head["rel_err"] <= tol:
        out.update(status="found", layer="head", hidden_state=None,
                   where="final norm / output head (every block output is within tolerance)",
                   rel_err=head["rel_err"], max_abs=head["max_abs"])
    else:
        out.update(status="none", layer=None, reason=f"every hidden state and the logits of a teacher-forced "
                   f"window are within the localisation tolerance ({tol:g}): no single layer stands out (the error "
                   "is spread over the layers; see largest_jump) or it lies in the KV-cache / decode path")
    return out


def _onnx_with_outputs(model_path: Path, run_file):
    """run(names) for an ONNX candidate: the file with `names` added as graph outputs, run by run_file(path)."""
    import onnx

    def run(names: list[str]) -> dict[str, np.ndarray]:
        model = onnx.load(str(model_path))
        existing = {o.name for o in model.graph.output}
        for name in names:
            if name not in existing:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
        with tempfile.TemporaryDirectory(prefix="edgekit-debug-") as tmp:
            path = Path(tmp) / "debug.onnx"
            onnx.save(model, str(path), save_as_external_data=model.ByteSize() > 1_500_000_000)
            del model
            return run_file(path)

    return run


def _surgery(cands: dict[int, list[str]], ref_model, ids: np.ndarray, precision: str, tol: float | None, run) -> dict:
    """Run the candidate with every block-output candidate as an extra output (run(names) -> {name: array},
    hidden states (1, W >= T, d_model), the first T positions compared) and compare with the reference."""
    import torch

    tol = tol if tol is not None else DEFAULT_HIDDEN_REL_ERR.get(precision, FALLBACK_HIDDEN_REL_ERR)
    cfg = ref_model.cfg
    T = ids.shape[1]
    if not cands:
        return {"status": "n/a", "reason": "the candidate graph carries no module-scope metadata to locate block outputs"}
    with torch.no_grad():
        ref_out = ref_model(torch.from_numpy(ids), output_hidden_states=True)
    values = run(list(dict.fromkeys(n for j in sorted(cands) for n in cands[j])))
    cand_hidden = {}
    for j, tensors in cands.items():
        fits = [values[n] for n in tensors if n in values and np.issubdtype(values[n].dtype, np.floating)
                and values[n].ndim == 3 and values[n].shape[0] == 1 and values[n].shape[1] >= T
                and values[n].shape[2] == cfg.d_model]
        if fits:
            cand_hidden[j] = fits[-1][:, :T]  # the last one produced: the block's final residual / norm
    missing = [j for j in range(cfg.n_layers + 1) if j not in cand_hidden]
    if missing:
        return {"status": "n/a", "reason": f"could not locate hidden states {missing} in the candidate graph"}
    logits = values.get("logits")
    result = _compare([h.numpy() for h in ref_out.hidden_states], cand_hidden, ref_out.logits.numpy(),
                      None if logits is None else logits[:, :T], tol)
    result["method"] = "graph-surgery"
    return result


def _candidates(onnx_path: Path, n_layers: int) -> dict[int, list[str]]:
    import onnx

    return block_output_candidates(onnx.load(str(onnx_path), load_external_data=False).graph, n_layers)


def locate(model_path: Path, target, ref_model, ids: np.ndarray, precision: str, tol: float | None = None) -> dict:
    """Graph surgery on the candidate ONNX file, run on `target`; {"status": "found"|"none"|"n/a", ...}."""
    run = _onnx_with_outputs(model_path, lambda path: _run_graph(path, ref_model.cfg, target, precision, ids))
    return _surgery(_candidates(model_path, ref_model.cfg.n_layers), ref_model, ids, precision, tol, run)


def locate_static(prefill_path: Path, window: int, target, ref_model, ids: np.ndarray, precision: str,
                  tol: float | None = None) -> dict:
    """Graph surgery on a static prefill graph over `window` positions (NPU variants), run on `target` with
    the same single-EP session as generation (toolkit.runtime.static.Graph): the first min(T, window)
    tokens fill the window (right padding) and those positions are compared."""
    from .runtime.static import Graph

    ids = ids[:, :window]
    n = ids.shape[1]

    def run_file(path):
        feeds = {k: np.zeros((1, window), np.int64) for k in ("input_ids", "position_ids", "attention_mask")}
        feeds["input_ids"][0, :n], feeds["position_ids"][0, :n], feeds["attention_mask"][0, :n] = ids[0], np.arange(n), 1
        return Graph(path, target, precision).run(feeds)

    run = _onnx_with_outputs(prefill_path, run_file)
    return _surgery(_candidates(prefill_path, ref_model.cfg.n_layers), ref_model, ids, precision, tol, run)


def locate_ir(xml_path: Path, source_onnx: Path, target, ref_model, ids: np.ndarray, precision: str,
              tol: float | None = None) -> dict:
    """Graph surgery on an OpenVINO IR variant (converted from, or compressed from, the bundle's ONNX
    `source_onnx`): OpenVINO keeps the ONNX tensor names, so the block outputs found in the ONNX graph's
    scopes are added as outputs of the IR (`Model.add_outputs`) and run on the target with the variant's own
    compile settings (precision hint included)."""
    import openvino as ov

    def run(names: list[str]) -> dict[str, np.ndarray]:
        model = ov.Core().read_model(str(xml_path))
        ports = {}
        for op in model.get_ordered_ops():
            for out in op.outputs():
                for name in out.get_names():
                    ports.setdefault(name, out)
        wanted = [n for n in names if n in ports]
        if wanted:
            model.add_outputs([ports[n] for n in wanted])
        with tempfile.TemporaryDirectory(prefix="edgekit-debug-") as tmp:
            path = Path(tmp) / "debug.xml"
            ov.save_model(model, str(path), compress_to_fp16=False)
            del model
            values = _run_graph(path, ref_model.cfg, target, precision, ids)
        for n in wanted:  # an output answers to any one of its tensor's names
            alias = next((a for a in ports[n].get_names() if a in values), None)
            if alias is not None:
                values[n] = values[alias]
        return values

    return _surgery(_candidates(source_onnx, ref_model.cfg.n_layers), ref_model, ids, precision, tol, run)


def locate_by_debug_export(ref_model, target, ids: np.ndarray, tol: float | None = None) -> dict:
    """fp32 only: re-export the reference with hidden-state outputs and run it on the target."""
    import torch

    from .export import export_onnx

    tol = tol if tol is not None else DEFAULT_HIDDEN_REL_ERR["fp32"]
    with torch.no_grad():
        ref_out = ref_model(torch.from_numpy(ids), output_hidden_states=True)
    with tempfile.TemporaryDirectory(prefix="edgekit-debug-") as tmp:
        path = export_onnx(ref_model, Path(tmp) / "debug.onnx", debug_hidden=True)
        values = _run_graph(path, ref_model.cfg, target, "fp32", ids)
    n = ref_model.cfg.n_layers
    cand = {j: values[f"hidden_states.{j}"] for j in range(n + 1) if f"hidden_states.{j}" in values}
    result = _compare([h.numpy() for h in ref_out.hidden_states], cand, ref_out.logits.numpy(), values.get("logits"), tol)
    result["method"] = "debug-export"
    return result
