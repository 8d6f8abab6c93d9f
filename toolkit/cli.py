"""The `edgekit` command line. Each command is a (configure, run) pair in COMMANDS; heavy modules are
imported inside the run functions so that commands on a bundle never import torch.

A ToolkitError becomes one line on stderr and a non-zero exit; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import sys

from .errors import ToolkitError


def _add_sampling(p: argparse.ArgumentParser):
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _load_recipe(a):
    """The recipe named on the command line, with --set, --steps and --seed applied as overrides."""
    from .config import load_recipe

    overrides = list(a.set)
    if a.steps is not None:
        overrides.append(f"training.steps={a.steps}")
    if a.seed is not None:
        overrides.append(f"training.seed={a.seed}")
    return load_recipe(a.recipe, overrides)


# --- train -----------------------------------------------------------------------------------------
def configure_train(p):
    p.add_argument("recipe", help="recipe name in models/ (tiny, small, teacher, moe-tiny) or a .toml path")
    p.add_argument("--corpus", help="text file, folder of .txt files, or .jsonl with a 'text' field (default: embedded corpus)")
    p.add_argument("--steps", type=int, help="total optimizer steps of the run (a resumed run continues up to this)")
    p.add_argument("--out", default=None, help="run folder (default runs/RECIPE)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    p.add_argument("--init", metavar="CHECKPOINT", help="fine-tune: start from this checkpoint's weights and tokenizer")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a recipe key")
    p.add_argument("--no-progress", action="store_true")


def run_train(a):
    from .train import train

    recipe = _load_recipe(a)
    out = a.out or f"runs/{recipe.name}"
    ckpt = train(recipe, out, corpus=a.corpus, resume=a.resume, overwrite=a.overwrite, init_from=a.init,
                 progress=not a.no_progress)
    print(f"checkpoint: {ckpt}")


# --- generate --------------------------------------------------------------------------------------
def configure_generate(p):
    p.add_argument("source", help="a checkpoint (or run folder) or a bundle")
    p.add_argument("prompt")
    _add_sampling(p)
    p.add_argument("--target", default="cpu", help="bundle only: target profile (default cpu)")
    p.add_argument("--precision", default=None, help="bundle only: model variant (default: the target's preferred precision, fp32 on cpu)")


def run_generate(a):
    from pathlib import Path

    if (Path(a.source) / "manifest.json").is_file():
        from . import runtime

        session = runtime.load(a.source, target=a.target, precision=a.precision)
        stream = session.stream(a.prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    else:
        from .sources import generate_text

        stream = generate_text(a.source, a.prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                               top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    sys.stdout.write(a.prompt)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


# --- explain ---------------------------------------------------------------------------------------
def configure_explain(p):
    p.add_argument("checkpoint")
    p.add_argument("prompt")


def configure_eval(p):
    p.add_argument("checkpoint", help="a checkpoint, run folder or local Hugging Face folder")
    p.add_argument("text", help="evaluation text: file, folder of .txt files, or .jsonl")
    p.add_argument("--seq-len", type=int, default=256, help="window length (non-overlapping windows)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")


def run_eval(a):
    import json
    import math

    from .data import load_documents, tokenize_documents
    from .sources import load_reference
    from .tokenizer import EOS
    from .train import evaluate

    model, tok = load_reference(a.checkpoint)
    seq = min(a.seq_len, model.cfg.context_len)
    tokens = tokenize_documents(tok, load_documents(a.text), tok.token_to_id(EOS))
    loss = evaluate(model, tokens, seq, 8, None if a.max_windows is None else -(-a.max_windows // 8))
    n = (len(tokens) - 1) // seq if a.max_windows is None else min(a.max_windows, (len(tokens) - 1) // seq)
    print(json.dumps({"checkpoint": str(a.checkpoint), "text": a.text, "tokens_scored": n * seq, "seq_len": seq,
                      "loss": round(loss, 5), "ppl": round(math.exp(loss), 3)}))


def run_explain(a):
    from .explain import render
    from .sources import load_reference, check_prompt

    model, tok = load_reference(a.checkpoint)
    check_prompt(model.cfg, tok, a.prompt)
    print(render(model, tok, a.prompt))


# --- import-hf / export-hf -------------------------------------------------------------------------
def configure_import_hf(p):
    p.add_argument("hf_dir", help="local Hugging Face folder (GPT2LMHeadModel, LlamaForCausalLM or Qwen2ForCausalLM) "
                                  "with config.json, model.safetensors or pytorch_model.bin, and tokenizer.json")
    p.add_argument("--out", required=True, metavar="CHECKPOINT", help="toolkit checkpoint folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run_import_hf(a):
    from .hf import import_hf

    print(f"checkpoint: {import_hf(a.hf_dir, a.out, overwrite=a.overwrite)}")


def configure_export_hf(p):
    p.add_argument("checkpoint", help="a llama-style checkpoint (rope, rmsnorm, swiglu, no biases, dense) or run folder")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (loads as LlamaForCausalLM)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run_export_hf(a):
    from .hf import export_hf

    print(f"Hugging Face folder: {export_hf(a.checkpoint, a.out, overwrite=a.overwrite)}")


# --- distill ---------------------------------------------------------------------------------------
def configure_distill(p):
    p.add_argument("recipe", help="student recipe (name in models/ or .toml path); its [tokenizer] is ignored: "
                                  "the student uses the teacher's tokenizer and vocabulary")
    p.add_argument("--teacher", required=True, metavar="SOURCE", help="teacher: a checkpoint, run folder or local Hugging Face folder")
    p.add_argument("--alpha", type=float, help="weight of the soft (KL) term; 1 - alpha weights the cross-entropy (default 0.5)")
    p.add_argument("--temperature", type=float, help="softmax temperature T of the KL term, scaled by T^2 (default 2.0)")
    p.add_argument("--top-k-cache", type=int, metavar="K", help="keep only the teacher's top-K logits, cached on disk per step (default 0: full logits, no cache)")
    p.add_argument("--cache-dir", help="where the top-K cache lives (default OUT/teacher-cache); share it between runs to reuse it")
    p.add_argument("--corpus", help="text file, folder of .txt files, or .jsonl with a 'text' field (default: embedded corpus)")
    p.add_argument("--steps", type=int, help="total optimizer steps of the run")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a recipe key")
    p.add_argument("--no-progress", action="store_true")


def run_distill(a):
    from .distill import distill

    recipe = _load_recipe(a)
    ckpt = distill(recipe, a.teacher, a.out, corpus=a.corpus, alpha=a.alpha, temperature=a.temperature,
                   top_k_cache=a.top_k_cache, cache_dir=a.cache_dir, resume=a.resume, overwrite=a.overwrite,
                   progress=not a.no_progress, overrides=a.set)
    print(f"checkpoint: {ckpt}")


# --- export ----------------------------------------------------------------------------------------
def configure_export(p):
    p.add_argument("checkpoint", help="a checkpoint folder or training run folder")
    p.add_argument("--out", required=True, metavar="BUNDLE", help="bundle folder to create")
    p.add_argument("--no-fp16", action="store_true", help="export the fp32 variant only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--external-data", action="store_true",
                   help="store weights in a separate .data file (automatic above 1.5 GB of weights)")


def run_export(a):
    from .bundle import Bundle
    from .export import export_bundle

    path = export_bundle(a.checkpoint, a.out, fp16=not a.no_fp16, overwrite=a.overwrite,
                         external_data=True if a.external_data else None)
    bundle = Bundle.open(path)
    for v in bundle.variants:
        size = bundle.variant_bytes(v) / 1e6
        print(f"  {v.name:6s} {v.model:20s} {size:8.2f} MB  export {v.export.get('seconds', 0):.1f} s  "
              f"max |logits - PyTorch| {v.export.get('check_max_abs', float('nan')):.2e}  targets: {', '.join(v.targets)}")
    print(f"bundle: {path}  ({bundle.manifest['export']['seconds']:.1f} s)")


# --- parity / pipeline -----------------------------------------------------------------------------
def _list(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def configure_parity(p):
    p.add_argument("bundle", help="a bundle folder (from edgekit export)")
    p.add_argument("--targets", metavar="LIST", help="comma-separated target profiles (default: cpu)")
    p.add_argument("--precisions", metavar="LIST", help="comma-separated precisions (default: every variant of the bundle for the target)")
    p.add_argument("--eval-text", metavar="PATH", help="evaluation text: file, folder of .txt or .jsonl (default: built-in stories, seed differs from training)")
    p.add_argument("--reference", metavar="CHECKPOINT", help="PyTorch reference (default: the bundle's source checkpoint, hash-checked)")
    p.add_argument("--report", metavar="DIR", help="write parity.json, parity.md and parity.html here")
    p.add_argument("--windows", type=int, default=8, metavar="N", help="teacher-forced evaluation windows (default 8)")
    p.add_argument("--decode-steps", type=int, default=32, metavar="N", help="cached decode steps per prompt (default 32)")
    p.add_argument("--strict", action="store_true", help="an unavailable target/precision fails too (exit 1)")
    p.add_argument("--no-record", action="store_true", help="do not record the parity summary in the bundle manifest")


def run_parity(a):
    from .parity import enforce, run

    report = run(a.bundle, targets=_list(a.targets), precisions=_list(a.precisions), eval_text=a.eval_text,
                 reference=a.reference, report_dir=a.report, windows=a.windows, decode_steps=a.decode_steps,
                 record=not a.no_record)
    c = report["counts"]
    print(f"parity: {report['verdict'].upper()} ({c['pass']} pass, {c['fail']} fail, {c['unavailable']} unavailable)")
    if report.get("files"):
        print(f"report: {report['files']['html']}")
    enforce(report, strict=a.strict)


def configure_pipeline(p):
    p.add_argument("recipe", help="recipe name in models/ or a .toml path")
    p.add_argument("--corpus", help="training text: file, folder of .txt files, or .jsonl (default: embedded corpus)")
    p.add_argument("--targets", metavar="LIST", help="comma-separated target profiles for parity (default: cpu)")
    p.add_argument("--steps", type=int, help="training steps (overrides the recipe)")
    p.add_argument("--out", required=True, metavar="DIR", help="pipeline folder: DIR/checkpoint, DIR/bundle, DIR/report")
    p.add_argument("--overwrite", action="store_true", help="retrain and re-export even if DIR holds a complete run")
    p.add_argument("--eval-text", metavar="PATH", help="parity evaluation text (default: built-in stories)")
    p.add_argument("--no-progress", action="store_true")


def run_pipeline(a):
    from .pipeline import run

    run(a.recipe, a.out, corpus=a.corpus, targets=_list(a.targets), steps=a.steps, overwrite=a.overwrite,
        eval_text=a.eval_text, progress=not a.no_progress)


# --- targets / fit / npu-build ---------------------------------------------------------------------
def configure_targets(p):
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_targets(a):
    import json

    from .probe import availability
    from .targets import all_targets

    rows = []
    for name, t in all_targets().items():
        usable, reason = availability(t)
        rows.append({"name": name, "runtime": t.runtime, "engine": t.engine, "precisions": list(t.precisions),
                     "static_shapes": t.static_shapes, "memory_budget_mb": t.memory_budget_mb,
                     "usable": usable, "reason": reason})
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'target':13s} {'runtime / engine':34s} {'precisions':20s} {'shapes':7s} {'budget':>9s}  usable here")
    for r in rows:
        budget = f"{r['memory_budget_mb']} MiB" if r["memory_budget_mb"] else "host"
        print(f"{r['name']:13s} {r['engine']:34s} {','.join(r['precisions']):20s} "
              f"{'static' if r['static_shapes'] else 'dynamic':7s} {budget:>9s}  {'yes' if r['usable'] else 'no'}: {r['reason']}")


def configure_fit(p):
    p.add_argument("source", nargs="?", help="a bundle folder, a checkpoint or run folder (config.json), a Hugging "
                                              "Face folder, or a recipe name; omit it with --params")
    p.add_argument("--target", required=True, help="target profile (see `edgekit targets`)")
    p.add_argument("--context", type=int, help="positions held (prompt + generated; default: the model's context)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--params", type=float, help="a bare parameter count (e.g. 7e9): a generic llama-like shape")
    p.add_argument("--precisions", help="comma-separated, or 'all' (default: the target's precisions)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_fit(a):
    import json

    from . import fit, targets
    from .errors import ConfigError

    if (a.source is None) == (a.params is None):
        raise ConfigError("give either a SOURCE (bundle, checkpoint, recipe) or --params N")
    shape = fit.generic_shape(a.params, context=a.context or 4096) if a.params else fit.shape_from_source(a.source)
    result = fit.plan(shape, targets.get(a.target), a.context, a.batch, _list(a.precisions))
    print(json.dumps(result, indent=2) if a.json else fit.render(result))


def configure_npu_build(p):
    p.add_argument("bundle", help="a bundle made by `edgekit export` (its source checkpoint must be present)")
    p.add_argument("--target", default="qnn-htp", choices=["qnn-htp", "openvino-npu"],
                   help="qnn-htp: QDQ a16w8 static pair (default); openvino-npu: float static pair, fp16 on the NPU")
    p.add_argument("--calibration", metavar="PATH", help="qnn-htp: calibration text (file, folder of .txt, .jsonl); "
                                                         "default: the embedded corpus")
    p.add_argument("--window", type=int, default=0, help="prefill window W (default: the target profile's)")
    p.add_argument("--cache", type=int, default=0, help="KV-cache slots C (default: the profile's, capped by the context)")
    p.add_argument("--checkpoint", help="the checkpoint the bundle was exported from (default: the manifest's)")


def run_npu_build(a):
    from . import npu

    if a.target == "qnn-htp":
        summary = npu.build_qnn_variant(a.bundle, a.calibration, a.window, a.cache, a.checkpoint)
    else:
        summary = npu.build_openvino_npu_variant(a.bundle, a.window, a.cache, a.checkpoint)
    for key, value in summary.items():
        print(f"  {key}: {value}")
    print(f"variant {summary['variant']} ({summary['precision']}) added to {a.bundle}")


# --- quantize --------------------------------------------------------------------------------------
def configure_quantize(p):
    from .quantize import METHODS

    p.add_argument("bundle", help="a bundle with an fp32 variant (from edgekit export)")
    p.add_argument("--precision", help="int8 | int4 (ORT / OpenVINO), fp32 | fp16 (OpenVINO IR), a16w8 (qnn-htp)")
    p.add_argument("--method", choices=list(METHODS), help="default: the method meeting the quality targets for the "
                   "precision on the target (see docs/quantization.md)")
    p.add_argument("--target", help="target profile the variant is for (default: cpu; openvino-cpu for ov-* methods)")
    p.add_argument("--group-size", type=int, metavar="G", help="4-bit: weights per scale (16, 32, 64, 128, 256; default 32)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None, help="4-bit / OpenVINO: symmetric weights (no zero points)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="4-bit / OpenVINO: asymmetric weights (default)")
    p.add_argument("--accuracy-level", type=int, metavar="N", help="ORT 4-bit: MatMulNBits accuracy_level (default 4: int8 activations per block, ~1.8x faster decode at the same measured quality; 0 or 1: fp32)")
    p.add_argument("--calibration", metavar="PATH", help="calibration text for data-aware methods (file, folder of .txt, .jsonl); "
                   "default: the source checkpoint's training corpus, else the embedded corpus (seed 7)")
    p.add_argument("--calibration-method", help="ort-int8-static: minmax (default) | entropy | percentile")
    p.add_argument("--activation-type", help="ort-int8-static: uint16 (default) | uint8 activations")
    p.add_argument("--keep-float", metavar="LAYERS", help="comma-separated layers kept in fp32: first, last, lm_head, "
                   "embed_tokens, or module patterns such as 'layers.*.mlp.down_proj'")
    p.add_argument("--search", action="store_true", help="try recipes (method x group size x layers kept in float), "
                   "keep the smallest that passes the target's parity thresholds, print the table")
    p.add_argument("--max-ppl-delta", type=float, metavar="PCT", help="--search: perplexity increase allowed, in %% "
                   "(default: the target profile's ppl_delta_pct_max)")
    p.add_argument("--check", action="store_true", help="measure the variant against the PyTorch reference before adding it; "
                   "a variant failing the target's thresholds is not added (exit 1)")
    p.add_argument("--eval-text", metavar="PATH", help="--search / --check: evaluation text (default: parity's built-in text)")
    p.add_argument("--windows", type=int, default=8, metavar="N", help="--search / --check: evaluation windows (default 8)")
    p.add_argument("--decode-steps", type=int, default=32, metavar="N", help="--search / --check: cached decode steps per prompt")


def run_quantize(a):
    from .errors import QuantizationError
    from .quantize import Options, quantize

    if a.max_ppl_delta is not None and not a.search:
        raise QuantizationError("--max-ppl-delta applies to --search only")
    opts = Options(group_size=a.group_size, symmetric=a.symmetric, accuracy_level=a.accuracy_level,
                   calibration=a.calibration, calibration_method=a.calibration_method,
                   activation_type=a.activation_type, keep_float=tuple(_list(a.keep_float) or ()))
    s = quantize(a.bundle, precision=a.precision, method=a.method, target=a.target, options=opts, search=a.search,
                 max_ppl_delta=a.max_ppl_delta, check=a.check, eval_text=a.eval_text, windows=a.windows,
                 decode_steps=a.decode_steps)
    for line in s.get("lines", []):
        print(line)
    q = (s.get("record") or {}).get("quality")
    if q:
        from .quantize import quality_line

        print(f"quality ({q['actual_precision']} on {s['target']}): {q['status'].upper()}  {quality_line(q)}")
    if "bytes" in s:
        print(f"variant {s['variant']} ({s['precision']}, {s['method']}) added to {a.bundle}: {s['bytes'] / 1e6:.2f} MB, "
              f"{s['ratio_to_fp32']:.3f}x the fp32 variant; check it with: edgekit parity {a.bundle} --targets "
              f"{s['target']} --precisions {s['precision']}")
    else:
        print(f"variant {s['variant']} ({s['precision']}) added to {a.bundle}")


# --- bench / optimize --------------------------------------------------------------------------------
def configure_bench(p):
    p.add_argument("source", help="a bundle; the PyTorch baseline is its source checkpoint (or --reference)")
    p.add_argument("--targets", metavar="LIST", help="comma-separated target profiles (default: cpu)")
    p.add_argument("--precisions", metavar="LIST", help="comma-separated precisions (default: every variant of the bundle for the target)")
    p.add_argument("--prompt-len", type=int, default=64, metavar="N", help="prompt tokens (default 64)")
    p.add_argument("--new-tokens", type=int, default=64, metavar="N", help="greedy decode steps timed (default 64)")
    p.add_argument("--threads", type=int, metavar="N", help="intra-op threads for every row, PyTorch included (default: all cores)")
    p.add_argument("--repeats", type=int, default=5, metavar="N", help="timed repeats after a warm-up; medians are reported (default 5)")
    p.add_argument("--report", metavar="DIR", help="write bench.json, bench.md and bench.png here")
    p.add_argument("--reference", metavar="CHECKPOINT", help="PyTorch reference (default: the bundle's source checkpoint, hash-checked)")
    p.add_argument("--loops", metavar="LIST", default="decoder",
                   help="decode loops to time: decoder (KV cache kept in the runtime, default) and/or forward (numpy forward() loop)")
    p.add_argument("--prompt-file", metavar="PATH", help="text whose first --prompt-len tokens are the prompt (default: embedded corpus)")
    p.add_argument("--rounds", type=int, default=1, metavar="N",
                   help="run the whole sweep N times in turn and pool the repeats (evens out a shared machine's load drift)")


def run_bench(a):
    from .bench import run

    report = run(a.source, targets=_list(a.targets), precisions=_list(a.precisions), prompt_len=a.prompt_len,
                 new_tokens=a.new_tokens, threads=a.threads, repeats=a.repeats, report_dir=a.report,
                 reference=a.reference, loops=tuple(_list(a.loops) or ["decoder"]), prompt_file=a.prompt_file,
                 rounds=a.rounds)
    if report.get("files"):
        print(f"report: {report['files']['md']}")


def configure_optimize(p):
    p.add_argument("bundle", help="a bundle made by `edgekit export` (its source checkpoint must be present, or --reference)")
    p.add_argument("--precisions", metavar="LIST", default="fp32,int4",
                   help="fused variants to add: fp32, int8, int4 (MatMulNBits, blocks of --group-size) (default fp32,int4)")
    p.add_argument("--group-size", type=int, default=32, help="int8/int4: weights per quantization block (default 32)")
    p.add_argument("--accuracy-level", type=int, default=4, help="int8/int4: MatMulNBits accuracy_level (4 = int8 activations, default)")
    p.add_argument("--reference", metavar="CHECKPOINT", help="the checkpoint the bundle was exported from (default: the manifest's)")


def run_optimize(a):
    from .fastgraph import add_fused_variants

    add_fused_variants(a.bundle, tuple(_list(a.precisions) or ["fp32"]), reference=a.reference,
                       block_size=a.group_size, accuracy_level=a.accuracy_level)
    print(f"fused variants added to {a.bundle} (the cpu target now runs them; check with `edgekit parity`)")


COMMANDS = {
    "train": (configure_train, run_train, "train a model from a recipe"),
    "generate": (configure_generate, run_generate, "generate text from a checkpoint or a bundle"),
    "explain": (configure_explain, run_explain, "walk one prompt through the model, layer by layer"),
    "eval": (configure_eval, run_eval, "perplexity of a checkpoint on a text (non-overlapping windows)"),
    "export": (configure_export, run_export, "export a checkpoint to an ONNX bundle (fp32 + fp16)"),
    "import-hf": (configure_import_hf, run_import_hf, "import a local Hugging Face GPT-2/Llama/Qwen2 folder as a checkpoint"),
    "export-hf": (configure_export_hf, run_export_hf, "export a llama-style checkpoint as a Hugging Face LlamaForCausalLM folder"),
    "distill": (configure_distill, run_distill, "distil a teacher (checkpoint or Hugging Face folder) into a student recipe"),
    "parity": (configure_parity, run_parity, "compare a bundle's variants with the PyTorch reference (exit 1 on failure)"),
    "pipeline": (configure_pipeline, run_pipeline, "train, export, quantize and check parity in one go"),
    "targets": (configure_targets, run_targets, "list every target profile and whether it is usable on this machine"),
    "fit": (configure_fit, run_fit, "estimate memory per precision and check it against a target's budget"),
    "quantize": (configure_quantize, run_quantize, "add int8 / 4-bit (ORT, OpenVINO) or qnn-htp variants to a bundle"),
    "npu-build": (configure_npu_build, run_npu_build, "build a static-shape NPU variant (qnn-htp QDQ or openvino-npu) into a bundle"),
    "optimize": (configure_optimize, run_optimize, "add fused ONNX Runtime graphs (GroupQueryAttention, in-place KV cache; fp32/int8/int4) to a bundle"),
    "bench": (configure_bench, run_bench, "time decoding (TTFT, prefill and decode tok/s, memory) of a bundle's variants vs PyTorch eager"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgekit", description="Train, export, quantize and verify compact transformers for edge targets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (configure, run, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        configure(p)
        p.set_defaults(_run=run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args._run(args)
    except ToolkitError as exc:
        print(f"edgekit {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
