"""The parity harness: does a bundle variant on a target compute what the PyTorch fp32 reference computes?

For each target x precision it runs the bundle through `toolkit.runtime` (the code that ships to the
device) and compares logits with the reference on
  (a) teacher-forced windows of an evaluation text (perplexity of both on the same tokens), and
  (b) a prefill plus `decode_steps` cached one-token steps for several prompts, both fed the reference's
      greedy tokens, so every step compares logits for identical inputs; the first step where the
      candidate's argmax differs is where free-running greedy generation would diverge.
Metrics are in toolkit/parity_metrics.py, thresholds come from the target profile (targets/*.toml), and
a failing result gets a first-divergence search (toolkit/parity_debug.py). A failure is never a warning:
`enforce` raises ParityFailure (exit code 1) listing every failure. See docs/parity.md.

Default evaluation text: stories from the embedded corpus grammar drawn with seed EVAL_SEED (training
uses seed 0), i.e. in-distribution synthetic text; pass eval_text (--eval-text) for real text.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .sysinfo import cpu_name, package_versions
from . import targets as target_profiles
from .bundle import Bundle, sha256_file
from .errors import BundleError, CheckpointError, ConfigError, DataError, ParityFailure, TargetUnavailable, ToolkitError
from .tokenizer import EOS
from .parity_metrics import LogitStats, check, greedy_match, log_softmax, merge_stats, parse_thresholds

EVAL_SEED = 4242  # default evaluation stories: toolkit.corpus.default_corpus(seed=EVAL_SEED)
MAX_WINDOW = 256  # evaluation window length: min(context_len, MAX_WINDOW)
N_PROMPTS, PROMPT_LEN = 3, 16


# --- the reference side ------------------------------------------------------------------------------
@dataclass
class Reference:
    model: object
    tok: object
    info: dict
    windows: list[np.ndarray] = field(default_factory=list)  # token ids (L + 1,) each
    logits: list[np.ndarray] = field(default_factory=list)  # (L, V) float32 per window
    prompts: list[np.ndarray] = field(default_factory=list)  # (Tp,) each
    decode_tokens: list[list[int]] = field(default_factory=list)  # reference greedy tokens, steps + 1 each
    decode_logits: list[np.ndarray] = field(default_factory=list)  # (Tp + steps, V): prefill rows then steps


def _checkpoint_sha(path: Path) -> tuple[Path, str | None]:
    from . import checkpoint

    ckpt = path if (path / "model.safetensors").is_file() else checkpoint.resolve(path)
    st = ckpt / "model.safetensors"
    return ckpt, (sha256_file(st) if st.is_file() else None)


def load_reference(bundle: Bundle, reference: str | Path | None) -> tuple[object, object, dict]:
    """The PyTorch fp32 reference: --reference, else the checkpoint the manifest names (hash-checked)."""
    from .sources import load_reference as load_source

    source = bundle.manifest.get("source") or {}
    if reference is None:
        named = source.get("checkpoint")
        if not named:
            raise CheckpointError(f"bundle {bundle.root} names no source checkpoint; pass --reference CHECKPOINT")
        if not Path(named).exists():
            raise CheckpointError(f"the bundle's source checkpoint {named} is not on this machine; "
                                  "pass --reference CHECKPOINT (the checkpoint the bundle was exported from)")
        ckpt, sha = _checkpoint_sha(Path(named))
        if source.get("sha256") and sha != source["sha256"]:
            raise CheckpointError(f"reference checkpoint {ckpt} has changed since the bundle was exported "
                                  f"(model.safetensors sha256 {str(sha)[:12]}… != manifest {source['sha256'][:12]}…); "
                                  "pass --reference with the checkpoint the bundle was exported from")
    else:
        if not Path(reference).exists():
            raise CheckpointError(f"--reference {reference} does not exist")
        ckpt, sha = _checkpoint_sha(Path(reference))
    model, tok = load_source(ckpt)
    model.eval()
    if model.cfg.__dict__ != bundle.model_config.__dict__:
        diff = [k for k, v in model.cfg.__dict__.items() if bundle.model_config.__dict__.get(k) != v]
        raise CheckpointError(f"reference {ckpt} has a different architecture from the bundle ({', '.join(diff)}); "
                              "pass --reference with the checkpoint the bundle was exported from")
    info = {"checkpoint": str(ckpt), "sha256": sha, "manifest_sha256": source.get("sha256"),
            "sha256_matches_manifest": sha is not None and sha == source.get("sha256"),
            "params": model.num_params(), "precision": "fp32", "runtime": f"PyTorch {torch.__version__}"}
    return model, tok, info


def eval_tokens(tok, eval_text: str | Path | None) -> tuple[np.ndarray, str]:
    from .data import load_documents, tokenize_documents

    eos = tok.token_to_id(EOS)
    if eval_text is None:
        from .corpus import default_corpus

        docs, desc = default_corpus(n_stories=400, seed=EVAL_SEED), f"built-in: toolkit.corpus.default_corpus(n_stories=400, seed={EVAL_SEED})"
    else:
        docs, desc = load_documents(eval_text), str(eval_text)
    if eos is None:
        ids = [i for d in docs for i in tok.encode(d, add_special_tokens=False).ids]
        return np.asarray(ids, dtype=np.int64), desc
    return tokenize_documents(tok, docs, eos), desc


SMALL_MODEL = 5_000_000  # parameters; below this the reference runs on one thread (see _threads)


@contextlib.contextmanager
def _threads(model):
    """One intra-op thread for small models: their one-token decode steps are latency-bound, and on a
    busy machine extra threads cost far more in synchronisation than they save (measured: 3-20x)."""
    before = torch.get_num_threads()
    if model.num_params() < SMALL_MODEL:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepare_reference(model, tok, info: dict, eval_text=None, windows: int = 8, decode_steps: int = 32) -> Reference:
    """Reference logits for the evaluation windows and the greedy decode runs (computed once)."""
    with _threads(model), torch.no_grad():
        return _prepare_reference(model, tok, info, eval_text, windows, decode_steps)


def _prepare_reference(model, tok, info, eval_text, windows, decode_steps) -> Reference:
    cfg = model.cfg
    if windows < 1 or decode_steps < 1:
        raise ConfigError("--windows and --decode-steps must be >= 1")
    tokens, desc = eval_tokens(tok, eval_text)
    L = min(cfg.context_len, MAX_WINDOW)
    n = min(windows, (len(tokens) - 1) // L)
    if n < 1:
        raise DataError(f"evaluation text {desc} is {len(tokens)} tokens; one window needs {L + 1} "
                        f"(min(context_len, {MAX_WINDOW}) + 1): use a longer text")
    prompt_len = max(1, min(PROMPT_LEN, cfg.context_len // 4))
    if prompt_len + decode_steps > cfg.context_len:
        raise ConfigError(f"--decode-steps {decode_steps} plus a {prompt_len}-token prompt exceeds the "
                          f"model's context of {cfg.context_len}; use --decode-steps {cfg.context_len - prompt_len}")
    ref = Reference(model, tok, info)
    for w in range(n):
        ids = tokens[w * L: w * L + L + 1]
        ref.windows.append(ids)
        ref.logits.append(model(torch.from_numpy(ids[None, :-1])).logits[0].float().numpy())
    starts = np.linspace(0, len(tokens) - prompt_len - 1, N_PROMPTS).astype(int)
    eos = tok.token_to_id(EOS)
    doc_starts = [0] + [int(i) + 1 for i in np.flatnonzero(tokens == eos) if i + 1 + prompt_len < len(tokens)]
    if eos is not None and len(doc_starts) >= N_PROMPTS:  # prompts begin at document starts
        starts = [doc_starts[int(k)] for k in np.linspace(0, len(doc_starts) - 1, N_PROMPTS)]
    for s in starts:
        prompt = tokens[s: s + prompt_len]
        out = model(torch.from_numpy(prompt[None]))
        rows = [out.logits[0].float().numpy()]
        toks = [int(out.logits[0, -1].argmax())]
        for _ in range(decode_steps):
            out = model(torch.tensor([[toks[-1]]]), past_key_values=out.present)
            rows.append(out.logits[0].float().numpy())
            toks.append(int(out.logits[0, -1].argmax()))
        ref.prompts.append(prompt)
        ref.decode_tokens.append(toks)
        ref.decode_logits.append(np.concatenate(rows))
    nll = [-log_softmax(lg)[np.arange(L), w[1:]] for lg, w in zip(ref.logits, ref.windows)]
    info["eval_text"] = {"source": desc, "tokens": int(len(tokens)), "windows": n, "window_len": L,
                         "ppl": float(np.exp(np.mean(nll)))}
    info["decode"] = {"prompts": [tok.decode(p.tolist()) for p in ref.prompts], "prompt_len": prompt_len,
                      "decode_steps": decode_steps, "greedy_tokens": decode_steps + 1}
    return ref


# --- the candidate side ------------------------------------------------------------------------------
def _as_f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def compare(session, ref: Reference, margin: float) -> tuple[dict, dict]:
    """(metrics, series) of a runtime Session against the reference."""
    win, dec = LogitStats(margin), LogitStats(margin)
    kl_pos = []
    # a static-shape session holds at most cache_len positions: compare that prefix of each window (causal,
    # so the reference's logits for the prefix are the same)
    k = min(len(ref.windows[0]) - 1, getattr(session, "cache_len", None) or len(ref.windows[0]))
    for ids, rl in zip(ref.windows, ref.logits):
        logits, _ = session.forward(ids[None, :k])
        kl_pos.append(win.update(rl[:k], _as_f32(logits)[0], ids[1:k + 1]))
    matches, kl_steps = [], []
    for prompt, toks, rl in zip(ref.prompts, ref.decode_tokens, ref.decode_logits):
        logits, present = session.forward(prompt[None])
        rows = [_as_f32(logits)[0]]
        for t in toks[:-1]:
            logits, present = session.forward(np.array([[t]], dtype=np.int64), past=present)
            rows.append(_as_f32(logits)[0])
        cand = np.concatenate(rows)
        kl = dec.update(rl, cand)
        kl_steps.append(kl[len(prompt) - 1:])
        matches.append(greedy_match(toks, cand[len(prompt) - 1:]))
    both = merge_stats(win, dec)
    pooled, w = both.summary(), win.summary()
    total = len(ref.decode_tokens[0])
    metrics = {k: pooled[k] for k in ("max_abs", "mean_abs", "cosine", "top1_agreement", "top5_overlap",
                                      "kl_mean", "kl_p99")}
    metrics.update(ppl=w["ppl"], ppl_reference=w["ppl_reference"], ppl_delta_pct=w["ppl_delta_pct"],
                   greedy_match_steps=min(matches), greedy_match_steps_per_prompt=matches, greedy_tokens=total,
                   greedy_agreement=min(matches) / total, nonfinite=pooled["nonfinite"],
                   near_ties=pooled["near_ties"], positions=pooled["positions"])
    d = dec.summary()
    metrics["phases"] = {"windows": {k: v for k, v in w.items() if k != "near_ties"},
                         "decode": {k: v for k, v in d.items() if k != "near_ties"}}
    with np.errstate(invalid="ignore"):
        series = {"abs_error_hist": both.histogram(),
                  "kl_per_position": [_num(v) for v in np.mean(kl_pos, axis=0)],
                  "kl_per_decode_step": [_num(v) for v in np.mean(kl_steps, axis=0)]}
    return metrics, series


def _num(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def actual_precision(session, precision: str) -> str:
    """What the device really computes in: the profile's `compute` map (e.g. the CPU runs an fp16 graph in
    fp32) or, for OpenVINO, the inference precision it was compiled with (bf16 unless told otherwise)."""
    if session.target.runtime == "openvino":
        try:
            hint = session.loaded.handle.get_property("INFERENCE_PRECISION_HINT")  # an openvino Type
            name = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
            return {"f32": "fp32", "f16": "fp16", "bf16": "bf16"}.get(name, name)
        except Exception:
            pass
    return (getattr(session.target, "compute", None) or {}).get(precision, precision)


def blank_result(target: str, precision: str | None, reason: str = "") -> dict:
    """A result with every stable key; status "unavailable" until something runs."""
    return {"target": target, "precision": precision, "status": "unavailable", "reason": reason, "variant": None,
            "actual_precision": None, "size_bytes": None, "metrics": None, "failures": [], "thresholds": None,
            "first_divergence": None, "series": None, "seconds": None}


def evaluate(bundle: Bundle, target, precision: str, ref: Reference, debug: bool = True) -> dict:
    """One result dict (see docs/parity.md) for target x precision."""
    from . import runtime

    res = blank_result(target.name, precision)
    if precision not in target.precisions:
        res["reason"] = f"target {target.name!r} does not support {precision} (supports {', '.join(target.precisions)})"
        return res
    try:
        variant = bundle.variant(precision, target.name)
    except BundleError as exc:
        res["reason"] = str(exc)
        return res
    res.update(variant=variant.name, size_bytes=bundle.variant_bytes(variant))
    if precision not in target.thresholds:
        res.update(status="fail", reason=f"target profile {target.name!r} has no [thresholds.{precision}] table; "
                   "add one (see docs/parity.md)")
        res["failures"] = [res["reason"]]
        return res
    checks, settings = parse_thresholds(target.thresholds[precision], f"targets/{target.name}.toml [thresholds.{precision}]")
    t0 = time.perf_counter()
    try:
        session = runtime.load(bundle, target=target.name, precision=precision)
    except TargetUnavailable as exc:
        res["reason"] = str(exc)
        return res
    except ToolkitError as exc:  # e.g. the runtime cannot load the graph: the candidate fails
        res.update(status="fail", reason=f"cannot load {variant.name} on {target.name}: {exc}")
        res["failures"] = [res["reason"]]
        return res
    picked = getattr(session, "variant", None)  # the runtime may prefer another variant (e.g. a fused graph)
    if getattr(picked, "name", variant.name) != variant.name:
        variant = picked
        res.update(variant=variant.name, size_bytes=bundle.variant_bytes(variant))
    res["actual_precision"] = actual_precision(session, precision)
    try:
        metrics, series = compare(session, ref, settings["near_tie_margin"])
    except Exception as exc:  # the candidate crashed: a failure of the candidate, reported as such
        res.update(status="fail", reason=f"the {target.name}/{precision} session raised {type(exc).__name__}: "
                   f"{(str(exc).strip().splitlines() or [''])[0]}")
        res["failures"] = [res["reason"]]
        return res
    failures = check(metrics, checks)
    res.update(metrics=metrics, series=series, failures=failures, status="fail" if failures else "pass",
               reason="; ".join(failures), thresholds=target.thresholds[precision],
               seconds=round(time.perf_counter() - t0, 3))
    nt = metrics["near_ties"]
    if failures and nt["top1_disagreements_on_near_ties"]:
        res["reason"] += (f" ({nt['top1_disagreements_on_near_ties']} of {nt['top1_disagreements']} top-1 "
                          f"disagreements are near ties, reference margin < {nt['margin']:g})")
    if failures and debug:
        res["first_divergence"] = first_divergence(bundle, variant, target, ref, settings)
    return res


def first_divergence(bundle: Bundle, variant, target, ref: Reference, settings: dict) -> dict:
    from . import parity_debug

    static = variant.export.get("static")
    model = variant.export["prefill"] if static else variant.model
    if target.static_shapes and not static:
        return {"status": "n/a", "reason": f"{target.name} needs static shapes; {variant.name} is not a static variant"}
    source = None
    if model.endswith(".xml") and not static:  # OpenVINO IR: block outputs are found in the ONNX variant it was built from
        name = variant.export.get("source_variant", "fp32")
        source = next((v.model for v in bundle.variants if v.name == name and v.model.endswith(".onnx")), None)
        if source is None:
            return {"status": "n/a", "reason": f"{model}: the bundle has no ONNX variant {name!r} to find its block outputs in"}
    elif not model.endswith(".onnx"):
        return {"status": "n/a", "reason": f"{model} is neither an ONNX graph nor an OpenVINO IR"}
    ids = ref.windows[0][None, :-1]
    tol = settings.get("first_divergence_rel_err")
    try:
        with _threads(ref.model):
            if source is not None:
                return parity_debug.locate_ir(bundle.path_of(model), bundle.path_of(source), target, ref.model, ids,
                                              variant.precision, tol)
            if static:  # the prefill graph of the pair: one teacher-forced window on the target's EP
                return parity_debug.locate_static(bundle.path_of(model), int(variant.export["window"]), target,
                                                  ref.model, ids, variant.precision, tol)
            result = parity_debug.locate(bundle.path_of(model), target, ref.model, ids, variant.precision, tol)
            if result["status"] == "n/a" and variant.precision == "fp32" and ref.info["sha256_matches_manifest"]:
                result = parity_debug.locate_by_debug_export(ref.model, target, ids, tol)
        return result
    except Exception as exc:  # a diagnosis must never hide the verdict it explains
        return {"status": "n/a", "reason": f"search failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"}


# --- the run -----------------------------------------------------------------------------------------
def environment() -> dict:
    versions = package_versions(("edgekit", "numpy", "torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu",
                                 "onnxruntime-qnn", "openvino", "tokenizers", "safetensors"))
    cpu = cpu_name()
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    except ImportError:
        providers = []
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "libraries": versions,
            "providers": providers}


def plan(bundle: Bundle, targets: list[str] | None, precisions: list[str] | None) -> list[tuple]:
    """[(Target, precision)]; unknown names are errors (exit 2), unavailable pairs become results."""
    profiles = target_profiles.all_targets()
    names = targets or ["cpu"]
    unknown = [t for t in names if t not in profiles]
    if unknown:
        raise TargetUnavailable(f"unknown target {', '.join(map(repr, unknown))}; known targets: {', '.join(profiles)}")
    known = ({p for t in profiles.values() for p in t.precisions} | {v.precision for v in bundle.variants}
             | set(getattr(target_profiles, "PRECISIONS", {})))
    bad = [p for p in precisions or [] if p not in known]
    if bad:
        raise ConfigError(f"unknown precision {', '.join(map(repr, bad))}; known precisions: {', '.join(sorted(known))}")
    pairs = []
    for name in names:
        t = profiles[name]
        for prec, table in t.thresholds.items():  # every threshold table is checked up front
            parse_thresholds(table, f"targets/{name}.toml [thresholds.{prec}]")
        mine = precisions or list(dict.fromkeys(v.precision for v in bundle.variants if name in v.targets))
        pairs += [(t, p) for p in mine] or [(t, None)]
    return pairs


def run(bundle_path, targets=None, precisions=None, eval_text=None, reference=None, report_dir=None,
        windows: int = 8, decode_steps: int = 32, record: bool = True, log=print) -> dict:
    """Run the harness; returns the report dict (written to report_dir as parity.json/.md/.html when
    given). Call `enforce(report)` for the verdict."""
    bundle = Bundle.open(bundle_path)
    pairs = plan(bundle, targets, precisions)
    model, tok, info = load_reference(bundle, reference)
    ref = prepare_reference(model, tok, info, eval_text, windows, decode_steps)
    results = []
    for target, precision in pairs:
        if precision is None:
            r = blank_result(target.name, None, f"bundle {bundle.root} has no variant for target {target.name!r}")
        else:
            r = evaluate(bundle, target, precision, ref)
        results.append(r)
        log(summary_line(r))
    counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "unavailable")}
    report = {"format": "edgekit-parity/1", "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "bundle": {"path": str(bundle.root), "variants": [v.name for v in bundle.variants]},
              "reference": info, "environment": environment(), "results": results,
              "verdict": "fail" if counts["fail"] else "pass", "counts": counts}
    if report_dir is not None:
        from .report import write_reports

        report["files"] = {k: str(v) for k, v in write_reports(report, report_dir).items()}
    if record:
        record_in_manifest(bundle, report)
    return report


def record_in_manifest(bundle: Bundle, report: dict):
    """variant["parity"][target] = a short summary, for every result that ran a variant."""
    keep = ("max_abs", "top1_agreement", "kl_mean", "ppl_delta_pct", "greedy_match_steps", "greedy_agreement", "nonfinite")
    for r in report["results"]:
        if not r.get("variant"):
            continue
        current = next(v for v in bundle.variants if v.name == r["variant"]).parity or {}
        entry = {"status": r["status"], "reason": r["reason"], "checked": report["generated"],
                 "reference_sha256": report["reference"]["sha256"],
                 "metrics": {k: r["metrics"][k] for k in keep} if r.get("metrics") else None}
        bundle.set_parity(r["variant"], {**current, r["target"]: entry})


def summary_line(r: dict) -> str:
    head = f"{r['target']}/{r['precision'] or '-'}: {r['status'].upper()}"
    m = r.get("metrics")
    if m:
        def fmt(v, spec, unit=""):
            return "n/a" if v is None else format(v, spec) + unit

        head += (f"  max_abs {fmt(m['max_abs'], '.2e')}  top1 {m['top1_agreement']:.4f}  kl_mean {fmt(m['kl_mean'], '.2e')}"
                 f"  ppl {fmt(m['ppl_delta_pct'], '+.3f', '%')}  greedy {m['greedy_match_steps']}/{m['greedy_tokens']}")
    if r["status"] != "pass" and r.get("reason"):
        head += f"\n    {r['reason']}"
    fd = r.get("first_divergence")
    if fd:
        head += f"\n    first divergence: {fd.get('where') or fd.get('reason')}"
    return head


def enforce(report: dict, strict: bool = False):
    """Raise ParityFailure listing every failure (and, with strict, every unavailable result)."""
    bad = [r for r in report["results"] if r["status"] == "fail" or (strict and r["status"] == "unavailable")]
    if bad:
        lines = [f"{r['target']}/{r['precision']}: {r['status']}: {r['reason']}" for r in bad]
        raise ParityFailure(f"{len(bad)} of {len(report['results'])} parity results failed: " + " | ".join(lines))
