"""ONNX export: a checkpoint becomes a bundle with an fp32 (and by default an fp16) ONNX variant.

The graph is traced with the dynamo exporter (`torch.onnx.export(..., dynamo=True, dynamic_shapes=...)`)
through `OnnxAdapter`, which gives the Transformer flat tensor inputs and outputs named as in
docs/architecture.md:

    inputs   input_ids (B, T) int64, position_ids (B, T) int64, attention_mask (B, P+T) int64,
             past_key_values.{i}.key / .value (B, n_kv, P, hd)
    outputs  logits (B, T, vocab), present.{i}.key / .value (B, n_kv, P+T, hd)
             [+ hidden_states.{j} (B, T, d_model), j = 0..n_layers, with debug_hidden=True]

B, T and P are dynamic; P = 0 (prefill with an empty cache) runs in the same graph. The example inputs
use sizes >= 2 because torch.export specialises dimensions of size 0 and 1.

fp16: `onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=False)`, so the fp16
graph takes and returns float16 past/present/logits (half the KV-cache memory; the runtime casts what
it feeds). keep_io_types=True is not used: with this exporter's graphs it yields a graph that is not
topologically sorted (onnx.checker rejects it). The position-only subgraph (rope / sinusoidal angles,
which reach ~context_len radians and would lose precision in fp16) stays in float32.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .bundle import TOKENIZER, build_manifest, new_bundle, sha256_file, write_manifest
from .errors import ExportError
from .model import Transformer

EXTERNAL_DATA_THRESHOLD = 1_500_000_000  # bytes of weights above which they go to a .data file
FP32_CHECK_MAX_ABS = 1e-3  # export_bundle refuses a graph whose logits differ more than this from PyTorch


def input_names(n_layers: int) -> list[str]:
    return ["input_ids", "position_ids", "attention_mask"] + [
        f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def output_names(n_layers: int, debug_hidden: bool = False) -> list[str]:
    names = ["logits"] + [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    if debug_hidden:
        names += [f"hidden_states.{j}" for j in range(n_layers + 1)]
    return names


class OnnxAdapter(nn.Module):
    """Transformer with flat tensor I/O: (input_ids, position_ids, attention_mask, [k0, v0, k1, v1, ...])
    -> (logits, k0', v0', ... [, hidden_0 .. hidden_L])."""

    def __init__(self, model: Transformer, debug_hidden: bool = False):
        super().__init__()
        self.model, self.debug_hidden = model, debug_hidden

    def forward(self, input_ids, position_ids, attention_mask, past: list[torch.Tensor]):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        out = self.model(input_ids, position_ids, attention_mask, pairs, output_hidden_states=self.debug_hidden)
        flat = [out.logits]
        for k, v in out.present:
            flat += [k, v]
        return tuple(flat + list(out.hidden_states))


def example_inputs(cfg, batch: int = 2, seq: int = 3, past: int = 4, seed: int = 0):
    """(input_ids, position_ids, attention_mask, past list) with real-looking values."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    pos = torch.arange(past, past + seq).unsqueeze(0).expand(batch, seq).contiguous()
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    kv = [torch.randn(batch, cfg.kv_heads, past, cfg.head_dim, generator=g) for _ in range(2 * cfg.n_layers)]
    return ids, pos, mask, kv


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress and registry warnings (e.g. 'torchvision is not installed')."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def export_onnx(model: Transformer, path: str | Path, debug_hidden: bool = False,
                external_data: bool | None = None) -> Path:
    """Export `model` to `path` (dynamic batch, sequence and past length) and run the ONNX checker.
    external_data: None = automatic (weights > 1.5 GB go to `<path>.data`), True / False to force."""
    from torch.export import Dim

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    model = model.eval()
    args = example_inputs(cfg, seq=min(3, max(cfg.context_len // 2, 2)), past=min(4, max(cfg.context_len // 2, 2)))
    batch, seq, past = Dim("batch"), Dim("seq"), Dim("past", min=0)
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: Dim.DYNAMIC},
                      [{0: batch, 2: past} for _ in range(2 * cfg.n_layers)])
    if external_data is None:
        external_data = _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                OnnxAdapter(model, debug_hidden), args, dynamo=True, dynamic_shapes=dynamic_shapes,
                input_names=input_names(cfg.n_layers), output_names=output_names(cfg.n_layers, debug_hidden),
                verbose=False)
            # the mask length is inferred as a fresh symbol; name it like the present outputs
            import onnx_ir as ir

            mask = program.model.graph.inputs[2]
            mask.shape = ir.Shape([mask.shape[0], "past + seq"])
            program.save(str(path), external_data=external_data)
    except ExportError:
        raise
    except Exception as exc:  # the exporter raises many types; keep the first line, the bug is ours
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {first}") from exc
    check_onnx(path)
    return path


def check_onnx(path: str | Path):
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"{path} fails the ONNX checker: {first}") from None


def _position_island(graph) -> list:
    """Nodes computed from position_ids and constants only (the rope / sinusoidal angle tables)."""
    consts = {t.name for t in graph.initializer}
    pos = {"position_ids"}
    island = []
    for node in graph.node:  # topologically sorted
        ins = [i for i in node.input if i]
        if not ins:
            consts.update(node.output)
        elif any(i in pos for i in ins) and all(i in pos or i in consts for i in ins):
            pos.update(node.output)
            island.append(node)
    return island


def _float_constants(graph) -> dict:
    """name -> TensorProto of initializers and Constant-node values."""
    found = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and not node.input:
            for a in node.attribute:
                if a.name == "value":
                    found[node.output[0]] = a.t
    return found


def _keep_positions_fp32(model16, model32):
    """Put the position island of a converted graph back into float32.

    Positions reach context_len and angles pos * inv_freq are ~context_len radians: in float16 the
    rotary / sinusoidal tables would be off by up to ~0.1 at position 255. So the island runs in fp32
    from the original fp32 constants, and its results are cast to fp16 where the fp16 graph uses them.
    (The converter's own node_block_list casts between every pair of blocked nodes, losing the precision
    anyway, and leaves an invalid graph.)"""
    from onnx import TensorProto, helper

    graph = model16.graph
    island = _position_island(graph)
    names = {id(n) for n in island}
    produced = {o for n in island for o in n.output}
    originals = _float_constants(model32.graph)
    converted = _float_constants(graph)
    for node in island:
        if node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT16:
                    a.i = TensorProto.FLOAT
        for j, name in enumerate(node.input):
            if name in converted and converted[name].data_type == TensorProto.FLOAT16 and name in originals:
                copy = originals[name].__class__()
                copy.CopyFrom(originals[name])
                copy.name = name + "__fp32"
                if copy.name not in {t.name for t in graph.initializer}:
                    graph.initializer.append(copy)
                node.input[j] = copy.name
    # island results used outside the island (or as graph outputs) go through a Cast to fp16
    used_outside = {i for n in graph.node if id(n) not in names for i in n.input} | {o.name for o in graph.output}
    for node in island:
        for j, out in enumerate(node.output):
            if out in used_outside and out in produced:
                node.output[j] = out + "__fp32"
                graph.node.append(helper.make_node("Cast", [out + "__fp32"], [out], to=TensorProto.FLOAT16,
                                                   name=f"{node.name}__to_fp16"))
    del graph.value_info[:]  # stale types; shape inference rebuilds them


def _toposort(graph):
    """Reorder graph.node topologically (nodes added above are appended at the end)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        done = [n for n in pending if all(i in ready for i in n.input)]
        if not done:
            raise ExportError(f"the fp16 graph has a cycle or a dangling input (node {pending[0].name!r})")
        for n in done:
            ordered.append(n)
            ready.update(n.output)
        pending = [n for n in pending if all(n is not d for d in done)]
    del graph.node[:]
    graph.node.extend(ordered)


def convert_fp16(src: str | Path, dst: str | Path, external_data: bool = False) -> Path:
    """Float16 copy of an fp32 ONNX model (float16 I/O; positions computed in fp32; see the module docstring)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model32 = onnx.load(str(src))
    model = onnx.ModelProto()
    model.CopyFrom(model32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model16 = convert_float_to_float16(model, keep_io_types=False)
    _keep_positions_fp32(model16, model32)
    _toposort(model16.graph)
    if external_data:
        onnx.save(model16, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=dst.name + ".data", size_threshold=1024)
    else:
        onnx.save(model16, str(dst))
    check_onnx(dst)
    return dst


def check_against_torch(model: Transformer, onnx_path: str | Path, seq: int = 8) -> float:
    """Max |logits| difference between PyTorch and ONNX Runtime (CPU) on a prefill and one cached step."""
    import onnxruntime as ort

    cfg = model.cfg
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    dtypes = {i.name: (np.float16 if i.type == "tensor(float16)" else np.float32) for i in sess.get_inputs()}
    seq = max(1, min(seq, cfg.context_len - 1))
    ids = torch.randint(0, cfg.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(1))
    names = input_names(cfg.n_layers)
    worst, past, P = 0.0, None, 0
    with torch.no_grad():
        for chunk in (ids[:, :seq], ids[:, seq:]):
            T = chunk.shape[1]
            pos = torch.arange(P, P + T).unsqueeze(0)
            mask = torch.ones(1, P + T, dtype=torch.long)
            ref = model(chunk, pos, mask, past)
            kv = ([torch.zeros(1, cfg.kv_heads, 0, cfg.head_dim)] * (2 * cfg.n_layers) if past is None
                  else [t for pair in past for t in pair])
            feeds = {"input_ids": chunk.numpy(), "position_ids": pos.numpy(), "attention_mask": mask.numpy()}
            feeds.update({n: t.numpy().astype(dtypes[n]) for n, t in zip(names[3:], kv)})
            logits = sess.run(["logits"], feeds)[0].astype(np.float32)
            if not np.isfinite(logits).all():
                return float("inf")
            worst = max(worst, float(np.abs(logits - ref.logits.numpy()).max()))
            past, P = ref.present, P + T
    return worst


def _variant_targets(precision: str) -> list[str]:
    """Targets that take a dynamic-shape graph in this precision (static-shape targets need their own)."""
    from .targets import all_targets

    return [t.name for t in all_targets().values() if precision in t.precisions and not t.static_shapes]


def _model_files(folder: Path, root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in folder.iterdir() if p.is_file())


def _load_source(path) -> tuple[Transformer, object, Path]:
    """(model, tokenizer, resolved folder) from a checkpoint, run folder or (via sources) any other source."""
    from . import checkpoint
    from .sources import load_reference

    model, tok = load_reference(path)
    try:
        folder = checkpoint.resolve(path)
    except Exception:
        folder = Path(path)
    return model, tok, Path(folder)


def _special_tokens(source, tok) -> dict:
    """Special token strings (eos, ...) of the source; Hugging Face imports have their own."""
    try:
        from .hf import special_tokens

        return special_tokens(source, tok)
    except (ImportError, AttributeError):
        from .tokenizer import SPECIAL_TOKENS

        return dict(zip(("bos", "eos", "pad", "unk"), SPECIAL_TOKENS))


def export_bundle(checkpoint_path: str | Path, out_dir: str | Path, fp16: bool = True, overwrite: bool = False,
                  external_data: bool | None = None) -> Path:
    """Export a checkpoint (or training run folder) to a new bundle at out_dir; returns its path."""
    started = time.perf_counter()
    model, tok, folder = _load_source(checkpoint_path)
    weights = folder / "model.safetensors"
    source = {"checkpoint": str(folder.resolve()), "sha256": sha256_file(weights) if weights.is_file() else None}
    if external_data is None:
        external_data = _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    common = {"exporter": "torch.onnx.export(dynamo=True)", "torch": torch.__version__,
              "external_data": bool(external_data), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with new_bundle(out_dir, overwrite=overwrite) as tmp:
        tok.save(str(tmp / TOKENIZER))
        t0 = time.perf_counter()
        fp32 = export_onnx(model, tmp / "fp32" / "model.onnx", external_data=external_data)
        fp32_seconds = time.perf_counter() - t0
        err = check_against_torch(model, fp32)
        if not err <= FP32_CHECK_MAX_ABS:
            raise ExportError(f"the exported graph disagrees with PyTorch (max |logits diff| {err:.3g} > "
                              f"{FP32_CHECK_MAX_ABS}); this is an exporter problem, please report it")
        variants = [{"name": "fp32", "precision": "fp32", "targets": _variant_targets("fp32"),
                     "files": _model_files(fp32.parent, tmp), "model": "fp32/model.onnx",
                     "export": {**common, "seconds": round(fp32_seconds, 3), "check_max_abs": err}}]
        if fp16:
            t0 = time.perf_counter()
            f16 = convert_fp16(fp32, tmp / "fp16" / "model.onnx", external_data=external_data)
            f16_seconds = time.perf_counter() - t0
            err16 = check_against_torch(model, f16)
            if not np.isfinite(err16):
                raise ExportError("the fp16 graph produces non-finite logits (overflow); export with --no-fp16")
            variants.append({"name": "fp16", "precision": "fp16", "targets": _variant_targets("fp16"),
                             "files": _model_files(f16.parent, tmp), "model": "fp16/model.onnx",
                             "export": {**common, "seconds": round(f16_seconds, 3), "check_max_abs": err16,
                                        "converter": "onnxruntime float16, keep_io_types=False"}})
        manifest = build_manifest(tmp, model.cfg.__dict__.copy(), source, variants)
        manifest["special_tokens"] = _special_tokens(checkpoint_path, tok)
        manifest["export"] = {"seconds": round(time.perf_counter() - started, 3)}
        write_manifest(tmp, manifest)
    return Path(out_dir)
