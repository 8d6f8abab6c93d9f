"""`edgekit pipeline`: recipe -> trained checkpoint -> bundle -> (quantized variants) -> parity reports.

    OUT/checkpoint/   training run (step-NNNNNN/ + latest); reused when complete and not --overwrite,
                      resumed when it is the same recipe stopped early
    OUT/bundle/       exported bundle; reused when it was exported from that checkpoint
    OUT/report/       parity.json / parity.md / parity.html

The exit code is the parity verdict (ParityFailure -> 1). The one-screen summary is printed either way.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from .errors import CheckpointError, QuantizationError, ToolkitError
from .report import _f, _size


def _comparable(recipe: dict) -> dict:
    """A recipe dict without the fields a rerun may change (steps) or training fills in (vocab_size)."""
    r = json.loads(json.dumps(recipe))
    r.get("model", {}).pop("vocab_size", None)
    r.get("training", {}).pop("steps", None)
    return r


def train_step(recipe, run_dir: Path, corpus, overwrite: bool, progress: bool, log) -> tuple[Path, str]:
    """(checkpoint folder, what happened). Reuses a complete matching run, resumes a shorter one."""
    from . import checkpoint
    from .train import train

    steps = recipe.training.steps
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        try:
            ckpt = checkpoint.resolve(run_dir)
            _, meta = checkpoint.read_config(ckpt)
            run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        except (ToolkitError, OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{run_dir} holds an incomplete or unreadable run ({exc}); "
                                  "pass --overwrite to train again") from None
        same_corpus = run.get("corpus") == (None if corpus is None else str(corpus))
        if _comparable(run.get("recipe", {})) != _comparable(recipe.to_dict()) or not same_corpus:
            raise CheckpointError(f"{run_dir} was trained from a different recipe or corpus; "
                                  "pass --overwrite to replace it (or choose another --out)")
        done = int(meta.get("step", 0))
        if done == steps:
            return ckpt, f"reused {ckpt} (step {done})"
        if done > steps:
            raise CheckpointError(f"{run_dir} is at step {done}, beyond --steps {steps}; pass --overwrite to retrain")
        log(f"training: resuming {run_dir} from step {done} to {steps}")
        t0 = time.perf_counter()
        ckpt = train(recipe, run_dir, corpus=corpus, resume=True, progress=progress)
        return ckpt, f"resumed from step {done} to {steps} in {time.perf_counter() - t0:.0f} s"
    t0 = time.perf_counter()
    ckpt = train(recipe, run_dir, corpus=corpus, overwrite=overwrite, progress=progress)
    return ckpt, f"trained {steps} steps in {time.perf_counter() - t0:.0f} s"


def export_step(ckpt: Path, bundle_dir: Path, overwrite: bool) -> tuple[Path, str]:
    """Reuse OUT/bundle when it was exported from exactly this checkpoint; otherwise (re-)export it."""
    from .bundle import Bundle, sha256_file
    from .export import export_bundle

    sha = sha256_file(ckpt / "model.safetensors")
    if bundle_dir.exists() and not overwrite:
        try:
            if (Bundle.open(bundle_dir).manifest.get("source") or {}).get("sha256") == sha:
                return bundle_dir, "reused (exported from this checkpoint)"
        except ToolkitError:
            pass  # unreadable or tampered: export again
    t0 = time.perf_counter()
    export_bundle(ckpt, bundle_dir, fp16=True, overwrite=True)
    return bundle_dir, f"exported in {time.perf_counter() - t0:.0f} s"


def quantize_step(bundle_dir: Path, targets: list[str] | None, log) -> tuple[str, list[str]]:
    """The quantization hook: for each target, every precision it supports that the bundle lacks and that
    toolkit.quantize has a default method for (e.g. int8 and int4 on cpu). Returns (note, failures)."""
    if importlib.util.find_spec("toolkit.quantize") is None:
        log("quantization: not available yet")
        return "not available yet", []
    from . import quantize
    from .bundle import Bundle
    from .targets import get

    if not hasattr(quantize, "quantize"):
        log("quantization: not available yet (toolkit.quantize has no quantize())")
        return "not available yet", []
    added, failed = [], []
    for name in targets or ["cpu"]:
        target = get(name)
        have = {v.precision for v in Bundle.open(bundle_dir, verify=False).variants if name in v.targets}
        for precision in target.precisions:
            if precision in have or (precision, target.runtime) not in getattr(quantize, "DEFAULTS", {}):
                continue
            try:
                s = quantize.quantize(bundle_dir, precision=precision, target=name, log=log)
                added.append(f"{s['variant']} {_size(s.get('bytes'))}")
            except ToolkitError as exc:
                failed.append(f"{name}/{precision}: {exc}")
                log(f"quantization: {name}/{precision} failed: {exc}")
    note = f"added {', '.join(added)}" if added else "nothing to add"
    return note + (f"; FAILED {'; '.join(failed)}" if failed else ""), failed


def _val_ppl(run_dir: Path) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    vals = [json.loads(line).get("val_ppl") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    vals = [v for v in vals if v is not None]
    return vals[-1] if vals else None


def summary(recipe, out: Path, ckpt: Path, notes: dict, report: dict) -> str:
    from .bundle import Bundle

    b = Bundle.open(out / "bundle", verify=False)
    sizes = {v.name: b.variant_bytes(v) for v in b.variants}
    total = sum(e["bytes"] for e in b.manifest["files"].values())
    lines = [f"pipeline {recipe.name} -> {out}",
             f"  model       {report['reference']['params']:,} parameters ({recipe.model.n_layers} layers, d_model {recipe.model.d_model})",
             f"  training    {notes['train']}; val ppl {_f(_val_ppl(out / 'checkpoint'), '.3f')}",
             f"  checkpoint  {ckpt}",
             f"  bundle      {out / 'bundle'}: {_size(total)} ({', '.join(f'{k} {_size(v)}' for k, v in sizes.items())}); {notes['export']}",
             f"  quantize    {notes['quantize']}"]
    for r in report["results"]:
        m = r.get("metrics")
        detail = (f"max_abs {_f(m['max_abs'], '.2e')}, top1 {m['top1_agreement']:.4f}, ppl {_f(m['ppl_delta_pct'], '+.3f')}%, "
                  f"greedy {m['greedy_match_steps']}/{m['greedy_tokens']}") if m else r.get("reason", "")
        lines.append(f"  parity      {r['target']}/{r['precision']}: {r['status'].upper():11s} {detail}")
    lines.append(f"  verdict     {report['verdict'].upper()}")
    lines.append(f"  report      {(report.get('files') or {}).get('html', out / 'report' / 'parity.html')}")
    return "\n".join(lines)


def run(recipe_name: str, out: str | Path, corpus=None, targets: list[str] | None = None, steps: int | None = None,
        overwrite: bool = False, eval_text=None, progress: bool = True, log=print) -> dict:
    """Run every stage and print the summary; returns the parity report. Raises ParityFailure (exit 1) when
    parity fails, then QuantizationError when a quantization step failed."""
    from . import parity
    from .config import load_recipe

    recipe = load_recipe(recipe_name, [f"training.steps={steps}"] if steps is not None else [])
    out = Path(out)
    if targets:  # fail on a misspelt target before training, not after
        from .targets import all_targets

        unknown = [t for t in targets if t not in all_targets()]
        if unknown:
            from .errors import TargetUnavailable

            raise TargetUnavailable(f"unknown target {', '.join(map(repr, unknown))}; known targets: {', '.join(all_targets())}")
    notes = {}
    ckpt, notes["train"] = train_step(recipe, out / "checkpoint", corpus, overwrite, progress, log)
    log(f"checkpoint: {ckpt} ({notes['train']})")
    bundle_dir, notes["export"] = export_step(ckpt, out / "bundle", overwrite)
    log(f"bundle: {bundle_dir} ({notes['export']})")
    notes["quantize"], quant_failures = quantize_step(bundle_dir, targets, log)
    report = parity.run(bundle_dir, targets=targets, eval_text=eval_text, reference=ckpt, report_dir=out / "report", log=log)
    log("")
    log(summary(recipe, out, ckpt, notes, report))
    parity.enforce(report)
    if quant_failures:
        raise QuantizationError(f"{len(quant_failures)} quantization step(s) failed: " + " | ".join(quant_failures))
    return report
