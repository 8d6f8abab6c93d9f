"""`edgekit bench`: decoding speed and memory of a bundle's variants, side by side with PyTorch eager.

    report = bench.run("bundles/small", targets=["cpu"], prompt_len=64, new_tokens=64, threads=2, repeats=5,
                       report_dir="reports/bench")

Design
- Every measurement (the PyTorch eager fp32 baseline and each target x variant) runs in a fresh Python
  subprocess (`python -m toolkit.bench --worker SPEC`), so the peak resident memory of one backend is not
  mixed with another's (ru_maxrss is per process and never goes down), a runtime worker never imports
  torch (the on-device situation), and one crashing backend cannot take the run down. Each worker also
  reports the resident memory right after its imports (`rss_base_mb`), so model + runtime memory is
  peak_rss_mb - rss_base_mb.
- The prompt is the same token ids for every row (the bundle tokenizer on the embedded corpus, or
  --prompt-file text), batch 1, greedy decoding with end-of-sequence ignored, so every row does the same
  work and their greedy tokens can be compared (`greedy_match`: leading tokens equal to the baseline's).
- Per worker: load (timed: `load_s`), one warm-up prefill + a few decode steps, then `repeats` times:
  prefill the prompt and take the first token (`ttft_ms`; `prefill_tok_s` = prompt_len / ttft), then
  `new_tokens` decode steps (`decode_tok_s` = new_tokens / their time). Reported: medians, and
  `decode_tok_s_spread` = max - min over the repeats (all values are in `decode_tok_s_all`).
- Rounds (`rounds` > 1): the whole sweep (baseline and every row) runs that many times in turn and each
  row pools its repeats over the rounds, so slow drifts of a shared machine's load hit every row alike.
- Threads: torch.set_num_threads(N) for the baseline; intra_op_num_threads = N (ONNX Runtime) or
  INFERENCE_NUM_THREADS = N (OpenVINO) for the runtime rows; OMP_NUM_THREADS = N for every worker.
- The runtime rows use the session's decode loop (`Session.decoder`, KV cache kept inside the runtime);
  `loops=("forward",)` measures the numpy `Session.forward` loop instead (the path before it existed).
- Unavailable targets / precisions are rows with status "unavailable" and the reason, never skipped.

bench.json: {"format", "generated", "bundle", "settings", "machine", "baseline", "results"}; each row has
target, precision, variant, loop, status, reason, ttft_ms, prefill_tok_s, decode_tok_s,
decode_tok_s_spread, decode_tok_s_all, load_s, peak_rss_mb, rss_base_mb, bundle_mb, ratio_vs_eager
(decode tok/s over the baseline's), prefill_ratio_vs_eager, greedy_match, device. bench.md and
bench.png (matplotlib) are rendered from it.

This module imports no torch at module level; only the baseline worker does.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .sysinfo import cpu_name, package_versions
from .errors import ConfigError, DataError, TargetUnavailable, ToolkitError

MARK = "EDGEKIT_BENCH_RESULT "
WARMUP_STEPS = 4
WORKER_TIMEOUT = 3600
ROW_KEYS = ("target", "precision", "variant", "loop", "status", "reason", "device", "ttft_ms", "prefill_tok_s",
            "decode_tok_s", "decode_tok_s_spread", "decode_tok_s_all", "load_s", "peak_rss_mb", "rss_base_mb",
            "bundle_mb", "ratio_vs_eager", "prefill_ratio_vs_eager", "greedy_match")
LIBRARIES = ("edgekit", "numpy", "torch", "onnx", "onnxruntime", "onnxruntime-genai", "openvino", "openvino-genai",
             "tokenizers", "transformers", "llama_cpp_python")


# --- helpers shared by the workers ---------------------------------------------------------------------
def _rss_mb() -> float:
    """Current resident set size (MB)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError):
        return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process (MB): VmHWM, which starts afresh at exec. (ru_maxrss does not:
    a child inherits the high-water mark of the parent it was forked from.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except (OSError, ValueError, IndexError):
        pass
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024 / 1e6 if sys.platform != "darwin" else kb / 1e6


def time_decoding(prefill, step, ids: list[int], new_tokens: int, repeats: int, warmup_steps: int = WARMUP_STEPS,
                  clock=time.perf_counter) -> dict:
    """Time greedy decoding. prefill(ids) -> last logits (vocab,); step(token) -> logits (vocab,).
    A warm-up (prefill + warmup_steps steps), then `repeats` x (prefill, new_tokens steps)."""
    logits = prefill(ids)
    for _ in range(min(warmup_steps, new_tokens)):
        logits = step(int(np.argmax(logits)))
    ttft, decode, tokens = [], [], []
    for r in range(repeats):
        t0 = clock()
        logits = prefill(ids)
        first = int(np.argmax(logits))
        t1 = clock()
        seq = [first]
        for _ in range(new_tokens):
            logits = step(seq[-1])
            seq.append(int(np.argmax(logits)))
        t2 = clock()
        ttft.append(t1 - t0)
        decode.append(new_tokens / (t2 - t1) if new_tokens else float("nan"))
        if r == 0:
            tokens = seq
    med_ttft = statistics.median(ttft)
    return {"ttft_ms": med_ttft * 1e3, "prefill_tok_s": len(ids) / med_ttft, "decode_tok_s": statistics.median(decode),
            "decode_tok_s_spread": max(decode) - min(decode), "decode_tok_s_all": decode,
            "ttft_ms_all": [t * 1e3 for t in ttft], "tokens": tokens}


# --- workers (each in its own process) --------------------------------------------------------------------
def _worker_eager(spec: dict) -> dict:
    import torch

    torch.set_num_threads(int(spec["threads"]))
    base = _rss_mb()
    from .bundle import Bundle
    from .parity import load_reference

    t0 = time.perf_counter()
    model, _, info = load_reference(Bundle.open(spec["bundle"]), spec.get("reference"))
    model.eval()
    load_s = time.perf_counter() - t0
    state = {}

    def prefill(ids):
        out = model(torch.tensor([ids]))
        state["past"] = out.present
        return out.logits[0, -1].numpy()

    def step(token):
        out = model(torch.tensor([[token]]), past_key_values=state["past"])
        state["past"] = out.present
        return out.logits[0, -1].numpy()

    with torch.inference_mode():
        timing = time_decoding(prefill, step, spec["ids"], spec["new_tokens"], spec["repeats"])
    return {**timing, "load_s": load_s, "rss_base_mb": base, "peak_rss_mb": peak_rss_mb(),
            "device": f"PyTorch {torch.__version__} eager fp32, {torch.get_num_threads()} threads",
            "params": model.num_params(), "checkpoint": info.get("checkpoint")}


def _threaded_target(target, threads: int):
    import dataclasses

    opts = dict(target.options)
    if target.runtime == "onnxruntime":
        opts.setdefault("intra_op_num_threads", threads)
    elif target.runtime == "openvino" and (target.device or "CPU").startswith("CPU"):
        opts.setdefault("INFERENCE_NUM_THREADS", threads)
    return dataclasses.replace(target, options=opts)


def _worker_runtime(spec: dict) -> dict:
    base = _rss_mb()
    from . import runtime
    from . import targets as target_profiles
    from .runtime import session as dynamic

    target = _threaded_target(target_profiles.get(spec["target"]), int(spec["threads"]))
    t0 = time.perf_counter()
    if target.static_shapes:
        session = runtime.load(spec["bundle"], target=target, precision=spec["precision"])
    else:
        session = dynamic.load(spec["bundle"], target=target, precision=spec["precision"], variant=spec.get("variant"))
    load_s = time.perf_counter() - t0
    capacity = len(spec["ids"]) + spec["new_tokens"] + WARMUP_STEPS + 1
    loop = spec.get("loop", "decoder")
    if loop == "decoder" and hasattr(session, "decoder"):
        holder = {}

        def prefill(ids):
            holder["dec"] = session.decoder(capacity)
            return holder["dec"].prefill(ids)

        def step(token):
            return holder["dec"].step(token)
    else:  # the numpy forward loop (and static sessions, whose forward keeps its own cache)
        state = {}

        def prefill(ids):
            logits, state["past"] = session.forward(np.asarray([ids], np.int64))
            return logits[0, -1]

        def step(token):
            logits, state["past"] = session.forward(np.asarray([[token]], np.int64), state["past"])
            return logits[0, -1]

    timing = time_decoding(prefill, step, spec["ids"], spec["new_tokens"], spec["repeats"])
    return {**timing, "load_s": load_s, "rss_base_mb": base, "peak_rss_mb": peak_rss_mb(),
            "device": session.device, "variant": session.variant.name if session.variant is not None else None,
            "torch_imported": "torch" in sys.modules}


WORKERS = {"eager": _worker_eager, "runtime": _worker_runtime}


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        result = {"status": "ok", **WORKERS[spec["kind"]](spec)}
    except TargetUnavailable as exc:
        result = {"status": "unavailable", "reason": str(exc)}
    except ToolkitError as exc:
        result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # a crashing backend is a result of the run, not the end of it
        result = {"status": "error", "reason": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"}
    sys.stdout.write("\n" + MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


def run_worker(spec: dict, timeout: int = WORKER_TIMEOUT) -> dict:
    """Run one measurement in a fresh interpreter and return its result dict."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(spec["threads"])
    env.setdefault("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    try:
        proc = subprocess.run([sys.executable, "-m", "toolkit.bench", "--worker", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"the measurement took longer than {timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "error", "reason": f"worker exited with code {proc.returncode}: {tail}"}


# --- planning and the run -----------------------------------------------------------------------------
def prompt_ids(tok, n: int, text: str | None = None) -> list[int]:
    """n token ids of `text` (default: stories of the embedded corpus), repeated if it is too short."""
    if text is None:
        from .corpus import default_corpus

        text = " ".join(default_corpus(n_stories=max(8, n // 8), seed=7))
    ids = tok.encode(text, add_special_tokens=False).ids
    if not ids:
        raise DataError("the prompt text tokenizes to no tokens")
    while len(ids) < n:
        ids = ids + ids
    return [int(i) for i in ids[:n]]


def machine(threads: int) -> dict:
    versions = package_versions(LIBRARIES)
    cpu = cpu_name()
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "physical_cores": physical, "threads": threads,
            "python": platform.python_version(), "platform": platform.platform(), "libraries": versions,
            "loadavg_start": [round(x, 2) for x in load] if load else None}


def plan(bundle, targets: list[str] | None, precisions: list[str] | None, loops: list[str]) -> list[dict]:
    """One entry per target x precision x matching variant x loop (unavailable ones with a reason)."""
    from . import targets as target_profiles
    from .probe import availability

    profiles = target_profiles.all_targets()
    names = targets or ["cpu"]
    unknown = [t for t in names if t not in profiles]
    if unknown:
        raise TargetUnavailable(f"unknown target {', '.join(map(repr, unknown))}; known targets: {', '.join(profiles)}")
    rows = []
    for name in names:
        t = profiles[name]
        usable, why = availability(t)
        wanted = precisions or list(dict.fromkeys(v.precision for v in bundle.variants if name in v.targets)) or [None]
        for precision in wanted:
            base = {"target": name, "precision": precision}
            if precision is None:
                rows.append({**base, "status": "unavailable", "reason": f"the bundle has no variant for {name}"})
                continue
            if precision not in t.precisions:
                rows.append({**base, "status": "unavailable",
                             "reason": f"target {name!r} does not support {precision} (supports {', '.join(t.precisions)})"})
                continue
            variants = [v for v in bundle.variants if v.precision == precision and name in v.targets]
            if t.static_shapes:
                variants = [v for v in variants if v.export.get("static")][:1]
            if not variants:
                rows.append({**base, "status": "unavailable",
                             "reason": f"the bundle has no {precision} variant for {name}"})
                continue
            for v in variants:
                for loop in loops:
                    row = {**base, "variant": v.name, "loop": loop,
                           "bundle_mb": sum(int(bundle.manifest["files"][f]["bytes"]) for f in v.files) / 1e6}
                    if not usable:
                        row.update(status="unavailable", reason=why)
                    rows.append(row)
    return rows


def pool(results: list[dict]) -> dict:
    """One result from the same measurement repeated in several rounds: medians over all repeats."""
    ok = [r for r in results if r.get("status") == "ok"]
    if not ok:
        return results[0]
    out = dict(ok[0])
    decode = [x for r in ok for x in r["decode_tok_s_all"]]
    ttft = [x for r in ok for x in r["ttft_ms_all"]]
    n_prompt = ok[0]["prefill_tok_s"] * ok[0]["ttft_ms"] / 1e3
    out.update(decode_tok_s=statistics.median(decode), decode_tok_s_spread=max(decode) - min(decode),
               decode_tok_s_all=decode, ttft_ms=statistics.median(ttft), ttft_ms_all=ttft,
               prefill_tok_s=n_prompt / (statistics.median(ttft) / 1e3), load_s=statistics.median(r["load_s"] for r in ok),
               peak_rss_mb=max(r["peak_rss_mb"] for r in ok), rss_base_mb=statistics.median(r["rss_base_mb"] for r in ok),
               rounds=len(ok))
    if len(ok) < len(results):
        out["reason"] = f"{len(results) - len(ok)} of {len(results)} rounds failed: {results[-1].get('reason')}"
    return out


def _row(entry: dict, result: dict, baseline: dict | None) -> dict:
    row = {k: None for k in ROW_KEYS}
    row.update({k: v for k, v in entry.items() if k in ROW_KEYS})
    row.update({k: v for k, v in result.items() if k in ROW_KEYS})
    row["status"] = result.get("status", entry.get("status"))
    if baseline and row["status"] == "ok" and baseline.get("status") == "ok":
        row["ratio_vs_eager"] = row["decode_tok_s"] / baseline["decode_tok_s"]
        row["prefill_ratio_vs_eager"] = row["prefill_tok_s"] / baseline["prefill_tok_s"]
        ref, mine = baseline.get("tokens") or [], result.get("tokens") or []
        match = 0
        for a, b in zip(ref, mine):
            if a != b:
                break
            match += 1
        row["greedy_match"] = f"{match}/{len(ref)}"
    return row


def run(source, targets=None, precisions=None, prompt_len: int = 64, new_tokens: int = 64, threads: int | None = None,
        repeats: int = 5, report_dir=None, reference=None, loops=("decoder",), prompt_file=None, rounds: int = 1,
        log=print) -> dict:
    """Measure every target x precision variant of the bundle `source` and the PyTorch eager baseline."""
    from .bundle import Bundle
    from .tokenizer import load_tokenizer

    bundle = Bundle.open(source)
    cfg = bundle.model_config
    entries = plan(bundle, targets, precisions, list(loops))  # unknown targets: an error before anything runs
    threads = int(threads or os.cpu_count() or 1)
    if min(prompt_len, new_tokens, repeats, threads, rounds) < 1:
        raise ConfigError("--prompt-len, --new-tokens, --repeats, --rounds and --threads must be >= 1")
    if prompt_len + new_tokens + WARMUP_STEPS + 1 > cfg.context_len:
        raise ConfigError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} (+{WARMUP_STEPS + 1} warm-up) exceed "
                          f"the model's context window ({cfg.context_len} positions)")
    bad_loops = [x for x in loops if x not in ("decoder", "forward")]
    if bad_loops:
        raise ConfigError(f"unknown loop {bad_loops[0]!r} (decoder, forward)")
    text = Path(prompt_file).read_text(encoding="utf-8") if prompt_file else None
    ids = prompt_ids(load_tokenizer(bundle.tokenizer_path), prompt_len, text)
    common = {"bundle": str(bundle.root), "ids": ids, "new_tokens": int(new_tokens), "repeats": int(repeats),
              "threads": threads}
    info = machine(threads)
    log(f"bench: {bundle.root}  prompt {prompt_len} tokens, {new_tokens} new, {repeats} repeats x {rounds} round(s), "
        f"{threads} threads")
    eager_spec = {**common, "kind": "eager", "reference": str(reference) if reference else None}
    raw_base, raw = [], [[] for _ in entries]
    for r in range(rounds):
        raw_base.append(run_worker(eager_spec))
        if raw_base[-1].get("status") != "ok":
            raise ToolkitError(f"the PyTorch eager baseline could not run: {raw_base[-1].get('reason')}")
        base = raw_base[-1]
        baseline = {"target": "pytorch-eager", "precision": "fp32", "variant": "checkpoint", "loop": "eager", **base}
        log(("" if rounds == 1 else f"round {r + 1}/{rounds}\n") + _line(baseline))
        for entry, got in zip(entries, raw):
            if entry.get("status") == "unavailable":
                got.append({"status": "unavailable", "reason": entry["reason"]})
                if r == 0:
                    log(_line(_row(entry, got[-1], None)))
                continue
            got.append(run_worker({**common, "kind": "runtime", "target": entry["target"],
                                   "precision": entry["precision"], "variant": entry["variant"], "loop": entry["loop"]}))
            log(_line(_row(entry, got[-1], baseline)))
    base = pool(raw_base)
    baseline = {"target": "pytorch-eager", "precision": "fp32", "variant": "checkpoint", "loop": "eager", **base}
    baseline["bundle_mb"] = None
    results = [_row(entry, pool(got), baseline) for entry, got in zip(entries, raw)]
    if rounds > 1:
        log("pooled over rounds:\n" + "\n".join(_line(x) for x in [baseline] + results))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    info["loadavg_end"] = [round(x, 2) for x in load] if load else None
    report = {"format": "edgekit-bench/1", "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "bundle": {"path": str(bundle.root), "model": cfg.__dict__.copy(), "params": base.get("params")},
              "settings": {"prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats, "rounds": rounds,
                           "threads": threads,
                           "loops": list(loops), "warmup_steps": WARMUP_STEPS, "prompt_file": prompt_file},
              "machine": info, "baseline": _row(baseline, baseline, None), "results": results}
    report["baseline"]["ratio_vs_eager"] = 1.0
    if report_dir is not None:
        report["files"] = {k: str(v) for k, v in write_reports(report, report_dir).items()}
    return report


# --- rendering ---------------------------------------------------------------------------------------------
def _f(v, spec=".1f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def _line(r: dict) -> str:
    if r.get("status") != "ok":
        return f"  {r['target']:14s} {str(r.get('precision')):6s} {str(r.get('variant') or '-'):14s} {r.get('status')}: {r.get('reason')}"
    return (f"  {r['target']:14s} {r['precision']:6s} {str(r.get('variant')):14s} {str(r.get('loop')):8s} "
            f"ttft {_f(r['ttft_ms'])} ms  prefill {_f(r['prefill_tok_s'], '.0f')} tok/s  decode {_f(r['decode_tok_s'])} "
            f"tok/s (±{_f(r['decode_tok_s_spread'] / 2)})  x{_f(1.0 if r['target'] == 'pytorch-eager' else r.get('ratio_vs_eager'), '.2f')} eager  "
            f"load {_f(r['load_s'], '.2f')} s  peak {_f(r['peak_rss_mb'], '.0f')} MB")


COLUMNS = [("target", "target", "s"), ("precision", "precision", "s"), ("variant", "variant", "s"), ("loop", "loop", "s"),
           ("ttft_ms", "TTFT ms", ".1f"), ("prefill_tok_s", "prefill tok/s", ".0f"), ("decode_tok_s", "decode tok/s", ".1f"),
           ("decode_tok_s_spread", "spread", ".1f"), ("ratio_vs_eager", "x eager", ".2f"), ("load_s", "load s", ".2f"),
           ("peak_rss_mb", "peak RSS MB", ".0f"), ("rss_base_mb", "base RSS MB", ".0f"), ("bundle_mb", "size MB", ".1f"),
           ("greedy_match", "greedy = eager", "s")]


def render_markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [f"# edgekit bench — {report['bundle']['path']}", "",
             f"- generated {report['generated']}; model {report['bundle'].get('params') or '?'} parameters",
             f"- machine: {m['cpu']}, {m['cores']} logical cores, {m['threads']} threads used; load average "
             f"{m.get('loadavg_start')} → {m.get('loadavg_end')}",
             f"- libraries: " + ", ".join(f"{k} {v}" for k, v in m["libraries"].items()),
             f"- batch 1, prompt {s['prompt_len']} tokens, {s['new_tokens']} greedy new tokens, median of "
             f"{s['repeats']} repeats x {s.get('rounds', 1)} round(s) after a warm-up; spread = max - min decode tok/s; "
             f"each row in its own process",
             "", "| " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in [report["baseline"]] + report["results"]:
        if r.get("status") != "ok":
            cells = [str(r.get(k) or "-") for k, _, _ in COLUMNS[:4]] + [f"**{r.get('status')}**: {r.get('reason')}"]
            cells += [""] * (len(COLUMNS) - len(cells))
        else:
            cells = [(str(r.get(k) if r.get(k) is not None else "-") if spec == "s" else _f(r.get(k), spec))
                     for k, _, spec in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [report["baseline"]] + [r for r in report["results"] if r.get("status") == "ok"]
    labels = [f"{r['target']}\n{r.get('variant')}" + (f"\n({r['loop']})" if r.get("loop") == "forward" else "")
              for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(rows) + 4), 4.5))
    for ax, key, title in ((axes[0], "decode_tok_s", "decode tokens/s (higher is better)"),
                           (axes[1], "ttft_ms", "time to first token, ms (lower is better)")):
        vals = [r[key] for r in rows]
        err = [r["decode_tok_s_spread"] / 2 for r in rows] if key == "decode_tok_s" else None
        bars = ax.bar(range(len(rows)), vals, yerr=err, color=["#999999"] + ["#3b7dd8"] * (len(rows) - 1), capsize=3)
        for b, r in zip(bars, rows):
            if key == "decode_tok_s":
                ax.annotate(f"x{r['decode_tok_s'] / rows[0]['decode_tok_s']:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(title, fontsize=10)
    s, m = report["settings"], report["machine"]
    fig.suptitle(f"{Path(report['bundle']['path']).name}: prompt {s['prompt_len']}, {s['new_tokens']} new tokens, "
                 f"{m['threads']} threads, {m['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(report: dict, out_dir) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "md": out / "bench.md", "png": out / "bench.png"}
    data = {k: v for k, v in report.items() if k != "files"}
    data["files"] = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    paths["md"].write_text(render_markdown(report), encoding="utf-8")
    try:
        plot(report, paths["png"])
    except ImportError:  # matplotlib is optional: JSON and Markdown still stand
        del paths["png"]
    return paths


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2]))
    sys.exit("usage: edgekit bench SOURCE (this module's own entry point is for its worker processes)")
