"""GPTQ (Frantar et al., 2022) for MatMulNBits, in numpy.

Why not ORT's own: onnxruntime 1.32's bundled `neural_compressor.weight_only.gptq` propagates the
quantization error with a column of the *upper*-triangular inverse-Hessian factor (`Hinv1[i:, i]`), which
is zero below the diagonal, so no error is ever compensated: its output equals round-to-nearest (measured:
bit-identical MatMulNBits tables on the `small` model). This is the algorithm as published: per input
column, quantize, then spread the scaled error over the not-yet-quantized columns with the row of the
upper Cholesky factor of H^-1; blocks of 128 columns with lazy batch updates; scales and zero points found
at the start of each group from the (already updated) weights.

H = 2/n X^T X from the fp32 activations of each MatMul's input on the calibration windows (one pass over
the fp32 graph, not layer-sequential), damped by 1% of its mean diagonal.
"""

from __future__ import annotations

import numpy as np


def hessians(model_path, nodes: dict[str, str], feeds: list[dict]) -> dict[str, np.ndarray]:
    """{input tensor: H (K, K)} for the given {node name: input tensor} over the calibration feeds."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path))
    tensors = sorted(set(nodes.values()))
    for t in tensors:
        model.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    H, n = {}, 0
    for feed in feeds:
        outs = sess.run(tensors, feed)
        for t, x in zip(tensors, outs):
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            H[t] = H.get(t, 0) + x.T @ x
        n += outs[0].reshape(-1, outs[0].shape[-1]).shape[0]
    return {t: 2.0 * h / n for t, h in H.items()}


def _params(w: np.ndarray, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (scale, zero point) of a (N, g) group on the 0..15 grid."""
    if sym:  # the value of largest magnitude maps to -8 exactly (as ORT's symmetric RTN); scale may be negative
        v = w[np.arange(len(w)), np.abs(w).argmax(axis=1)]
        v = np.where(np.abs(v) < 1e-12, 1e-12, v)
        return v / -8.0, np.full(len(w), 8.0)
    lo, hi = np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0)
    scale = np.maximum(hi - lo, 1e-12) / 15.0
    return scale, np.clip(np.round(-lo / scale), 0, 15)


def gptq(W: np.ndarray, H: np.ndarray, group: int, sym: bool, percdamp: float = 0.01, blocksize: int = 128):
    """W (K, N) float -> (codes (K, N) uint8 in 0..15, scales (N, K/group), zero points (N, K/group))."""
    K, N = W.shape
    Wt = W.T.astype(np.float64).copy()  # (N, K): columns are the input dimensions GPTQ walks over
    H = H.copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    Wt[:, dead] = 0.0
    H[np.diag_indices(K)] += percdamp * np.mean(np.diag(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper factor U with U^T U = H^-1
    n_groups = -(-K // group)
    scales, zeros = np.zeros((N, n_groups)), np.zeros((N, n_groups))
    codes = np.zeros((N, K), np.uint8)
    scale = zero = None
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = Wt[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:
                span = np.concatenate([W1[:, i:], Wt[:, i2:]], axis=1)[:, :group]
                scale, zero = _params(span, sym)
                scales[:, col // group], zeros[:, col // group] = scale, zero
            w = W1[:, i]
            q = np.clip(np.round(w / scale) + zero, 0, 15)
            codes[:, col] = q
            err = (w - (q - zero) * scale) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        Wt[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes.T, scales.astype(W.dtype), zeros.astype(np.uint8)


def pack(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group: int):
    """MatMulNBits initializers: B (N, k_blocks, group/2) uint8 low nibble first, scales (N, k_blocks),
    zero points (N, ceil(k_blocks/2)) uint8 low nibble first. K is padded to whole groups with the zero point."""
    K, N = codes.shape
    kb = scales.shape[1]
    q = np.repeat(zeros, group, axis=1)[:, :kb * group].astype(np.uint8)  # (N, kb*group), padding = zero point
    q[:, :K] = codes.T
    q = q.reshape(N, kb, group)
    B = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)
    z = np.zeros((N, kb + (kb % 2)), np.uint8)
    z[:, :kb] = zeros
    zp = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
    return B, scales, zp


def quantize_model(model, layers, kept: dict, hs: dict, group: int, sym: bool, level: int, log=print):
    """Replace every weight MatMul (not kept) by a GPTQ MatMulNBits node, in place."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    todo = {l.node: l for l in layers if l.op == "MatMul" and l.weight and l.node not in kept}
    nodes = []
    for node in graph.node:
        layer = todo.get(node.name)
        if layer is None or node.input[1] not in inits:
            nodes.append(node)
            continue
        W = numpy_helper.to_array(inits[node.input[1]])
        codes, scales, zeros = gptq(W, hs[node.input[0]], group, sym)
        B, S, Z = pack(codes, scales, zeros, group)
        base = node.input[1] + "_gptq"
        graph.initializer.extend([numpy_helper.from_array(B, base + "_Q4"), numpy_helper.from_array(S, base + "_scales"),
                                  numpy_helper.from_array(Z, base + "_zero_points")])
        attrs = {"K": W.shape[0], "N": W.shape[1], "bits": 4, "block_size": group}
        if level:
            attrs["accuracy_level"] = level
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], base + "_Q4", base + "_scales", base + "_zero_points"],
                                      list(node.output), name=node.name + "_Q4", domain="com.microsoft", **attrs))
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    from .graph import prune

    prune(model)
    return model
