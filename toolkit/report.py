"""Parity reports: parity.json first (stable keys, docs/parity.md), then parity.md and parity.html rendered
from that JSON alone. The HTML embeds its plots as base64 PNG (matplotlib, Agg backend) so it opens
offline; without matplotlib it is written without plots and says so. Every file is written to a
temporary name in the report folder and moved into place with os.replace; nothing is written elsewhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path


def clean(obj):
    """JSON-safe copy: numpy scalars/arrays to Python, non-finite floats to None (never NaN in JSON)."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy scalar or array
        return clean(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_reports(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write parity.json, then parity.md and parity.html rendered from the JSON text."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(clean(report), indent=2, allow_nan=False) + "\n"
    paths = {"json": out / "parity.json", "md": out / "parity.md", "html": out / "parity.html"}
    _write_atomic(paths["json"], text)
    data = json.loads(text)
    _write_atomic(paths["md"], render_markdown(data))
    _write_atomic(paths["html"], render_html(data))
    return paths


# --- formatting ------------------------------------------------------------------------------------
def _f(v, spec: str = ".3g", missing: str = "n/a") -> str:
    return missing if v is None else format(v, spec)


def _size(n) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _divergence(fd) -> str:
    if not fd:
        return ""
    if fd.get("status") == "found":
        return f"{fd.get('where')} (rel err {_f(fd.get('rel_err'))})"
    return f"{fd.get('status')}: {fd.get('reason', '')}"


COLUMNS = ["target", "precision", "status", "size", "max abs", "mean abs", "cosine", "top-1", "top-5",
           "KL mean", "KL p99", "ppl (Δ%)", "greedy", "near ties", "first divergence"]


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for r in report["results"]:
        m = r.get("metrics") or {}
        nt = m.get("near_ties") or {}
        ppl = f"{_f(m.get('ppl'), '.3f')} ({_f(m.get('ppl_delta_pct'), '+.3f')}%)" if m else ""
        greedy = f"{m['greedy_match_steps']}/{m['greedy_tokens']} {m.get('greedy_match_steps_per_prompt')}" if m else ""
        ties = f"{nt.get('count', 0)} ({nt.get('top1_disagreements_on_near_ties', 0)}/{nt.get('top1_disagreements', 0)} flips)" if nt else ""
        status = r["status"].upper()
        rows.append([r["target"], str(r["precision"] or "-"), status, _size(r.get("size_bytes")),
                     _f(m.get("max_abs"), ".2e", ""), _f(m.get("mean_abs"), ".2e", ""), _f(m.get("cosine"), ".6f", ""),
                     _f(m.get("top1_agreement"), ".4f", ""), _f(m.get("top5_overlap"), ".4f", ""),
                     _f(m.get("kl_mean"), ".2e", ""), _f(m.get("kl_p99"), ".2e", ""), ppl, greedy, ties,
                     _divergence(r.get("first_divergence"))])
    return rows


def _header_lines(report: dict) -> list[str]:
    ref = report["reference"]
    ev, dec = ref.get("eval_text", {}), ref.get("decode", {})
    match = "matches the bundle manifest" if ref.get("sha256_matches_manifest") else "does NOT match the bundle manifest"
    c = report.get("counts", {})
    return [
        f"Bundle: `{report['bundle']['path']}`",
        f"Reference: `{ref['checkpoint']}` ({ref.get('runtime')}, fp32; model.safetensors sha256 "
        f"`{str(ref.get('sha256'))[:16]}`, {match}); {ref.get('params', 0):,} parameters",
        f"Evaluation text: {ev.get('source')} — {ev.get('tokens')} tokens, {ev.get('windows')} teacher-forced "
        f"windows of {ev.get('window_len')}; reference ppl {_f(ev.get('ppl'), '.3f')}",
        f"Decode: {len(dec.get('prompts', []))} prompts of {dec.get('prompt_len')} tokens, prefill + "
        f"{dec.get('decode_steps')} cached steps fed the reference's greedy tokens ({dec.get('greedy_tokens')} greedy tokens compared)",
        f"Verdict: **{report['verdict'].upper()}** ({c.get('pass', 0)} pass, {c.get('fail', 0)} fail, "
        f"{c.get('unavailable', 0)} unavailable)",
    ]


def render_markdown(report: dict) -> str:
    lines = ["# Parity report", "", *[f"- {x}" for x in _header_lines(report)], ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in table_rows(report):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    notes = [r for r in report["results"] if r["status"] != "pass"]
    if notes:
        lines += ["", "## Failures and unavailable results", ""]
        for r in notes:
            lines.append(f"- **{r['target']}/{r['precision']}** {r['status']}: {r.get('reason', '')}")
            fd = r.get("first_divergence")
            if fd and fd.get("per_layer"):
                errs = ", ".join(f"h{e['hidden_state']} {_f(e['rel_err'], '.2e')}" for e in fd["per_layer"])
                lines.append(f"  - first divergence ({fd.get('method')}, tolerance {fd.get('tolerance'):g}): "
                             f"{_divergence(fd)}; relative error per hidden state: {errs}")
            elif fd:
                lines.append(f"  - first divergence: {_divergence(fd)}")
    env = report["environment"]
    libs = ", ".join(f"{k} {v}" for k, v in env.get("libraries", {}).items())
    lines += ["", "## Environment", "", f"- {env.get('cpu')} ({env.get('cpu_count')} CPUs), {env.get('platform')}, "
              f"Python {env.get('python')}", f"- {libs}", f"- ONNX Runtime providers: {', '.join(env.get('providers', []))}",
              "", "Metrics: docs/parity.md. max/mean abs: logits; KL: KL(reference || candidate) per position, nats; "
              "greedy: leading greedy tokens identical to the reference (min over prompts / total, per prompt).", ""]
    return "\n".join(lines)


# --- HTML with plots -------------------------------------------------------------------------------
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plots(report: dict) -> dict[str, str]:
    """{title: base64 PNG}; empty when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    ran = [r for r in report["results"] if r.get("series")]
    out = {}
    if not ran:
        return out
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for r in ran:
        h = r["series"]["abs_error_hist"]
        total = max(sum(h["counts"]), 1)
        ax.stairs([c / total for c in h["counts"]], [max(e, 1e-10) for e in h["edges"]], label=f"{r['target']}/{r['precision']}")
    ax.set(xscale="log", xlabel="|logit error|", ylabel="fraction of logits", title="Logit error histogram")
    ax.legend(fontsize=8)
    out["Logit error histogram"] = _png(fig)
    plt.close(fig)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    floor = 1e-18  # KL of an exact match is 0; plotted at the floor of the log scale
    for r in ran:
        label = f"{r['target']}/{r['precision']}"
        for ax_, key in ((a1, "kl_per_position"), (a2, "kl_per_decode_step")):
            ax_.plot([max(v, floor) if v is not None else float("nan") for v in r["series"][key]], label=label)
    a1.set(xlabel="position in window", ylabel="KL (nats)", title="KL per position (mean over windows)")
    a2.set(xlabel="decode step (0 = prefill's last position)", ylabel="KL (nats)", title="KL per decode step (mean over prompts)")
    for a in (a1, a2):
        a.set_yscale("log")
        a.legend(fontsize=8)
    fig.tight_layout()
    out["KL per position"] = _png(fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for r in ran:
        m = r["metrics"]
        y = m.get("kl_mean")
        if r.get("size_bytes") and y is not None:
            ax.scatter(r["size_bytes"] / 2**20, max(y, 1e-16), s=40)
            ax.annotate(f"{r['target']}/{r['precision']} ({_f(m.get('ppl_delta_pct'), '+.2f')}% ppl)",
                        (r["size_bytes"] / 2**20, max(y, 1e-16)), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set(yscale="log", xlabel="variant size (MB)", ylabel="KL mean (nats)", title="Quality vs size")
    out["Quality vs size"] = _png(fig)
    plt.close(fig)
    return out


def render_html(report: dict) -> str:
    e = html.escape
    verdict = report["verdict"]
    colour = {"PASS": "#1a7f37", "FAIL": "#cf222e", "UNAVAILABLE": "#9a6700"}
    head = "".join(f"<li>{e(x).replace('**', '')}</li>" for x in _header_lines(report))
    cells = "".join(f"<th>{e(c)}</th>" for c in COLUMNS)
    rows = ""
    for row in table_rows(report):
        tds = "".join(f"<td style='color:{colour[c]};font-weight:bold'>{e(c)}</td>" if i == 2 and c in colour
                      else f"<td>{e(c)}</td>" for i, c in enumerate(row))
        rows += f"<tr>{tds}</tr>"
    notes = "".join(f"<li><b>{e(r['target'])}/{e(str(r['precision']))}</b> {e(r['status'])}: {e(r.get('reason', ''))}"
                    f"{'<br>first divergence: ' + e(_divergence(r.get('first_divergence'))) if r.get('first_divergence') else ''}</li>"
                    for r in report["results"] if r["status"] != "pass")
    imgs = plots(report)
    figures = "".join(f"<h2>{e(t)}</h2><img alt='{e(t)}' src='data:image/png;base64,{b}'>" for t, b in imgs.items())
    if not imgs:
        figures = "<p><i>Plots need matplotlib: pip install edgekit[report]</i></p>"
    env = report["environment"]
    libs = ", ".join(f"{k} {v}" for k, v in env.get("libraries", {}).items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>edgekit parity: {e(verdict)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left}}th{{background:#f3f3f3}}img{{max-width:100%}}</style></head>
<body><h1>Parity report: <span style="color:{colour.get(verdict.upper(), '#000')}">{e(verdict.upper())}</span></h1>
<ul>{head}</ul>
<table><tr>{cells}</tr>{rows}</table>
{f'<h2>Failures and unavailable results</h2><ul>{notes}</ul>' if notes else ''}
{figures}
<h2>Environment</h2><p>{e(str(env.get('cpu')))} ({env.get('cpu_count')} CPUs), {e(str(env.get('platform')))}, Python {e(str(env.get('python')))}<br>
{e(libs)}<br>ONNX Runtime providers: {e(', '.join(env.get('providers', [])))}</p>
<p>Metric definitions: docs/parity.md. Generated {e(str(report.get('generated')))}.</p>
</body></html>
"""
