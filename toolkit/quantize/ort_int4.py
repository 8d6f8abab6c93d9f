"""4-bit weight-only quantization with ONNX Runtime's MatMulNBits (CPU; the contrib op also has CUDA kernels).

Every MatMul with a constant weight (K, N) becomes MatMulNBits: 4-bit weights in blocks of `group_size`
along K, one scale (and, asymmetric, one 4-bit zero point) per block. A K that the group size does not
divide is padded up to the next block (MatMulNBits' own rule); the record lists every padded layer.

rtn   DefaultWeightOnlyQuantConfig: round-to-nearest, symmetric or asymmetric.
hqq   HQQWeightOnlyQuantConfig: Half-Quadratic Quantization optimises scales and (float) zero points per
      block without data (asymmetric by construction).
gptq  GPTQWeightOnlyQuantConfig: second-order error compensation column by column using calibration
      activations (ORT's bundled Intel Neural Compressor code).

Embedding table (Gather): 4-bit GatherBlockQuantized with blocks along d_model. When the output head is
tied to the embedding (the default recipes) and both are quantized with RTN, the Gather reads the output
head's MatMulNBits table (uint8-packed, same blocks, same scales) through a Reshape: one 4-bit copy of the
table instead of two. HQQ (float zero points, which GatherBlockQuantized does not take) and GPTQ keep a
separate RTN copy for the Gather.

accuracy_level (MatMulNBits attribute): 0/1 compute in fp32 after dequantizing the weights; 4 quantizes
the activations to int8 per block and uses integer dot products (faster on CPUs with VNNI/AMX, and a
known source of top-1 flips: the measured effect is in docs/quantization.md).
"""

from __future__ import annotations

import numpy as np

from ..errors import QuantizationError
from .graph import finish


def _first(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def _settings(job, algo: str, symmetric: bool | None) -> dict:
    return {"algorithm": algo, "bits": 4, "group_size": job.options.value("group_size"),
            "symmetric": symmetric, "accuracy_level": job.options.value("accuracy_level"),
            "format": "MatMulNBits (com.microsoft), GatherBlockQuantized for the embedding"}


def _run(model, algo_config, job, **kw):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(model, block_size=job.options.value("group_size"), nodes_to_exclude=job.exclude_nodes(),
                             algo_config=algo_config, **kw)
    try:
        q.process()
    except Exception as exc:
        raise QuantizationError(f"MatMulNBits quantization ({algo_config.algorithm}) failed: {_first(exc)}") from exc
    return q.model.model


def _copy(model):
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _gather_pass(model, job, symmetric: bool):
    """Quantize embedding Gathers to 4-bit GatherBlockQuantized (RTN, blocks along the row)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    cfg = DefaultWeightOnlyQuantConfig(block_size=job.options.value("group_size"), is_symmetric=symmetric,
                                       op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),))
    return _run(model, cfg, job)


def _post(model, job) -> list[dict]:
    """Set accuracy_level on every MatMulNBits; list the layers whose K was padded to whole blocks."""
    from onnx import helper

    level = job.options.value("accuracy_level")
    _, layers, _, _ = job.prepared()
    names = {l.node: l.name for l in layers}
    padded = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a for a in node.attribute}
        if level:
            if "accuracy_level" in attrs:
                attrs["accuracy_level"].i = level
            else:
                node.attribute.append(helper.make_attribute("accuracy_level", level))
        K, bs = attrs["K"].i, attrs["block_size"].i
        if K % bs:
            base = node.name[:-3] if node.name.endswith("_Q4") else node.name
            padded.append({"layer": names.get(base, base), "node": node.name, "K": int(K),
                           "padded_to": int(-(-K // bs) * bs), "group_size": int(bs)})
    return padded


def _share_tied_embedding(model, job) -> dict[str, str]:
    """Point the embedding Gather at the tied output head's MatMulNBits table (see the module docstring).
    Returns {} or a note about what was shared."""
    from onnx import helper, numpy_helper

    _, layers, kept, _ = job.prepared()
    emb = [l for l in layers if l.kind == "embedding"]
    heads = [l for l in layers if l.kind == "lm_head" and l.tied and l.node not in kept]
    if len(emb) != 1 or len(heads) != 1 or emb[0].node in kept or emb[0].weight != heads[0].weight:
        return {}
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.name == heads[0].node + "_Q4"), None)
    gather = next((n for n in graph.node if n.name == emb[0].node and n.op_type == "Gather"), None)
    if head is None or gather is None:
        return {}
    attrs = {a.name: a.i for a in head.attribute}
    K, N, bs = attrs["K"], attrs["N"], attrs["block_size"]
    if K % bs:
        return {}
    shape_name = head.input[1] + "_rows"
    if shape_name not in inits:
        graph.initializer.append(numpy_helper.from_array(np.array([N, -1], np.int64), shape_name))
    data = head.input[1] + "_as_rows"
    reshape = helper.make_node("Reshape", [head.input[1], shape_name], [data], name=gather.name + "_shared_table")
    inputs = [data, gather.input[1], head.input[2]] + ([head.input[3]] if len(head.input) > 3 and head.input[3] else [])
    gbq = helper.make_node("GatherBlockQuantized", inputs, list(gather.output), name=gather.name + "_Q4",
                           domain="com.microsoft", bits=4, block_size=bs, gather_axis=0, quantize_axis=1)
    nodes = list(graph.node)
    i = nodes.index(gather)
    del graph.node[:]
    graph.node.extend(nodes[:i] + [reshape, gbq] + nodes[i + 1:])
    from .graph import prune

    prune(model)
    return {"shared_embedding": f"{emb[0].name} reads {heads[0].name}'s 4-bit table ({N}x{K}, group {bs})"}


def _save(model, job):
    import onnx

    onnx.save(model, str(job.output))
    return job.output


def _finish(model, job, algo: str, symmetric, extra: dict | None = None):
    padded = _post(model, job)
    record = {"tool": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
              "settings": _settings(job, algo, symmetric), "padded": padded, **(extra or {})}
    out = finish(job, _save(model, job), record)
    if padded:
        out.report_lines.append("group size does not divide K; padded to whole blocks: " + ", ".join(
            f"{p['layer']} K={p['K']}->{p['padded_to']}" for p in padded))
    if extra and extra.get("shared_embedding"):
        out.report_lines.append(f"tied embedding: {extra['shared_embedding']}")
    return out


def rtn(job):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    model, *_ = job.prepared()
    sym = job.options.value("symmetric")
    cfg = DefaultWeightOnlyQuantConfig(block_size=job.options.value("group_size"), is_symmetric=sym,
                                       accuracy_level=job.options.value("accuracy_level") or None,
                                       op_types_to_quantize=("MatMul",), quant_axes=(("MatMul", 0),))
    qmodel = _run(_copy(model), cfg, job)
    extra = _share_tied_embedding(qmodel, job)
    if not extra:
        qmodel = _gather_pass(qmodel, job, sym)
    return _finish(qmodel, job, "RTN", sym, extra)


def hqq(job):
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

    model, *_ = job.prepared()
    cfg = HQQWeightOnlyQuantConfig(block_size=job.options.value("group_size"), bits=4,
                                   op_types_to_quantize=("MatMul",), quant_axes=(("MatMul", 0),))
    qmodel = _run(_copy(model), cfg, job)
    qmodel = _gather_pass(qmodel, job, False)
    return _finish(qmodel, job, "HQQ", False, {"embedding": "4-bit RTN asymmetric (HQQ's float zero points do not "
                                                             "fit GatherBlockQuantized)"})


def gptq(job):
    """GPTQ with calibration data (toolkit/quantize/gptq.py: ORT's bundled GPTQ compensates no error)."""
    from . import gptq as G
    from .calibration import feeds

    model, layers, kept, src = job.prepared()
    sym = job.options.value("symmetric")
    group = job.options.value("group_size")
    cal = job.calibration()
    inputs = {n.name: n.input[0] for n in model.graph.node}
    todo = {l.node: inputs[l.node] for l in layers if l.op == "MatMul" and l.weight and l.node not in kept}
    job.log(f"GPTQ on {cal.windows} windows of {cal.window} tokens from {cal.source}")
    try:
        hs = G.hessians(src, todo, feeds(cal, job.cfg))
        qmodel = G.quantize_model(_copy(model), layers, kept, hs, group, sym, job.options.value("accuracy_level"))
    except Exception as exc:
        raise QuantizationError(f"GPTQ quantization failed: {_first(exc)}") from exc
    extra = _share_tied_embedding(qmodel, job)
    if not extra:
        qmodel = _gather_pass(qmodel, job, sym)
    return _finish(qmodel, job, "GPTQ", sym, {"calibration": cal.describe(), **extra,
                                             "gptq": {"percdamp": 0.01, "blocksize": 128, "actorder": False,
                                                      "activations": "fp32 graph, all layers in one pass"}})
