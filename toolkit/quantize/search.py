"""Recipe search: try quantization recipes and keep the smallest variant that passes the parity thresholds.

A recipe is (method, options): group size, symmetric or not, and which sensitive layers stay in fp32
(--keep-float: none, the output head, the first or last block). Every recipe is built first (cheap next
to measuring), then the candidates are measured against the PyTorch reference in order of size,
smallest first, with toolkit.parity's API (see measure.py); the first that passes is the smallest
passing one, so larger candidates are not measured. The table of everything built and measured is
printed and stored in the chosen variant's record. If nothing passes, nothing is added (ParityFailure,
exit 1) and the bundle is unchanged.
"""

from __future__ import annotations

import itertools
import shutil
import time
from dataclasses import replace

from ..errors import ParityFailure, QuantizationError

KEEPS = ((), ("lm_head",), ("last",), ("first", "last"))


def recipes(precision: str, target, method=None) -> list[tuple[str, dict]]:
    """[(method name, option overrides)] for a precision on a target. Without --method the grid holds the
    methods that build in seconds (RTN / data-free NNCF, dynamic and static int8); HQQ, GPTQ and AWQ take
    10-100x longer to build on the `small` model, so they are searched only when named with --method."""
    from . import METHODS

    runtime = target.runtime
    groups = (32, 64, 128)
    if precision == "int4" and runtime == "onnxruntime":
        grid = [("ort-int4-rtn", {"symmetric": s, "group_size": g}) for s in (False, True) for g in groups]
    elif precision == "int8" and runtime == "onnxruntime":
        grid = [("ort-int8-dynamic", {}), ("ort-int8-static", {"activation_type": "uint16"}),
                ("ort-int8-static", {"activation_type": "uint8", "calibration_method": "percentile"})]
    elif precision == "int4" and runtime == "openvino":
        grid = [("ov-int4-weights", {"symmetric": s, "group_size": g}) for s in (False, True) for g in groups]
    elif precision == "int8" and runtime == "openvino":
        grid = [("ov-int8-weights", {"symmetric": False}), ("ov-int8-weights", {"symmetric": True}),
                ("ov-int8-static", {})]
    else:
        raise QuantizationError(f"--search covers int8 and int4 on ONNX Runtime and OpenVINO, not {precision} on {target.name}")
    if method is not None:
        grid = [(m, o) for m, o in grid if m == method.name]
        if not grid:
            opts = METHODS[method.name].options
            grid = [(method.name, {"group_size": g}) for g in groups] if "group_size" in opts else [(method.name, {})]
    return grid


def pinned(grid: list[tuple[str, dict]], options) -> list[tuple[str, dict]]:
    """Options the user gave pin the grid (e.g. --group-size 32 --search tries group 32 only)."""
    from . import METHODS

    keep = []
    for m, o in grid:
        o = dict(o)
        for key in options.given():
            if key in METHODS[m].options:
                o[key] = getattr(options, key)
        if (m, o) not in keep:
            keep.append((m, o))
    return keep


def with_keeps(grid: list[tuple[str, dict]], options) -> list[tuple[str, dict]]:
    keeps = KEEPS if not options.keep_float else ((),)  # --keep-float given: search around it
    return [(m, {**o, "keep_float": k}) for (m, o), k in itertools.product(grid, keeps)]


def _label(method: str, opts: dict) -> str:
    parts = [method]
    if "group_size" in opts:
        parts.append(f"g{opts['group_size']}")
    if opts.get("symmetric") is not None:
        parts.append("sym" if opts["symmetric"] else "asym")
    for k in ("activation_type", "calibration_method"):
        if k in opts:
            parts.append(opts[k])
    parts.append("keep:" + ("+".join(opts["keep_float"]) if opts.get("keep_float") else "-"))
    return " ".join(parts)


def _row(label, bytes_, ratio, q=None, status="", note="") -> dict:
    m = (q or {}).get("metrics") or {}
    return {"recipe": label, "bytes": bytes_, "ratio_to_fp32": ratio, "ppl_delta_pct": m.get("ppl_delta_pct"),
            "top1_agreement": m.get("top1_agreement"), "kl_mean": m.get("kl_mean"),
            "status": status or (q or {}).get("status", ""), "note": note or (q or {}).get("reason", "")}


def _short(note: str, n: int = 110) -> str:
    return note if len(note) <= n else note[: n - 3] + "..."


def table_lines(rows: list[dict]) -> list[str]:
    def f(v, spec):
        width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
        return "-".rjust(width) if v is None else format(v, spec)

    out = [f"{'recipe':44s} {'MB':>7s} {'x fp32':>7s} {'dppl %':>8s} {'top1':>7s} {'kl_mean':>9s}  result"]
    for r in rows:
        mb = None if r["bytes"] is None else r["bytes"] / 1e6
        out.append(f"{r['recipe']:44s} {f(mb, '7.3f')} {f(r['ratio_to_fp32'], '7.3f')} {f(r['ppl_delta_pct'], '+8.3f')} "
                   f"{f(r['top1_agreement'], '7.4f')} {f(r['kl_mean'], '9.2e')}  {r['status']}"
                   f"{': ' + _short(r['note']) if r['note'] else ''}")
    return out


def search(bundle, precision: str, target, options, method=None, max_ppl_delta=None, eval_text=None,
           windows: int = 8, decode_steps: int = 32, log=print) -> dict:
    from . import METHODS, _work_dir, build, install, quality_line, summary, variant_name
    from .measure import Evaluator

    grid = with_keeps(pinned(recipes(precision, target, method), options), options)
    work = _work_dir(bundle)
    rows, built = [], []
    try:
        evaluator = Evaluator(bundle, target, precision, eval_text, windows, decode_steps, log, max_ppl_delta)
        for i, (name, over) in enumerate(grid):
            opts = replace(options, **{k: v for k, v in over.items()})
            opts = replace(opts, keep_float=tuple(over.get("keep_float", ())) + tuple(options.keep_float))
            label = _label(name, over)
            t0 = time.perf_counter()
            try:
                out = build(bundle, METHODS[name], precision, target, opts, work / f"c{i:02d}", log=lambda *_: None)
            except QuantizationError as exc:
                rows.append(_row(label, None, None, status="not built", note=str(exc)))
                log(f"  built {label}: failed ({exc})")
                continue
            built.append((out.record["size"]["bytes"], i, label, out))
            log(f"  built {label}: {out.record['size']['bytes'] / 1e6:.3f} MB ({time.perf_counter() - t0:.1f} s)")
        chosen = None
        for size, i, label, out in sorted(built, key=lambda b: (b[0], b[1])):
            if chosen is not None:
                rows.append(_row(label, size, out.record["size"]["ratio_to_fp32"], status="not measured",
                                 note="larger than the chosen recipe"))
                continue
            q = evaluator.measure(out.model)
            rows.append(_row(label, size, out.record["size"]["ratio_to_fp32"], q))
            log(f"  measured {label}: {q['status']} ({quality_line(q)})")
            if q["status"] == "pass":
                chosen = (label, out, q)
        rows = [r for r in rows if r["bytes"] is not None] + [r for r in rows if r["bytes"] is None]
        lines = table_lines(rows)
        if chosen is None:
            raise ParityFailure(f"no {precision} recipe for {target.name} passes the thresholds "
                                f"({evaluator.thresholds}); nothing was added:\n" + "\n".join(lines))
        label, out, q = chosen
        out.record["quality"] = q
        out.record["search"] = {"chosen": label, "thresholds": evaluator.thresholds, "table": rows}
        name = variant_name(precision, target)
        install(bundle, out, work, name, [target.name], precision)
        s = summary(bundle, name, out)
        s["lines"] = ["search:"] + lines + [f"chosen: {label}"] + out.report_lines
        return s
    finally:
        shutil.rmtree(work, ignore_errors=True)
