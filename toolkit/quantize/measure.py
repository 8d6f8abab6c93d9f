"""Quality of a candidate model file against the PyTorch fp32 reference, with toolkit.parity's own API.

The reference (the bundle's source checkpoint, hash-checked) is prepared once — evaluation windows and
greedy decode runs — and every candidate is then loaded with the runtime (`load_model_file`) on the
target and compared with `parity.compare`; the verdict uses the target profile's thresholds for the
precision (`parity_metrics.check`), optionally with a tighter or looser ppl_delta_pct limit.
"""

from __future__ import annotations

import time

from ..errors import QuantizationError

KEEP = ("ppl_delta_pct", "top1_agreement", "kl_mean", "kl_p99", "max_abs", "greedy_agreement", "greedy_match_steps",
        "ppl", "ppl_reference", "nonfinite", "positions")


class Evaluator:
    def __init__(self, bundle, target, precision: str, eval_text=None, windows: int = 8, decode_steps: int = 32,
                 log=print, max_ppl_delta: float | None = None):
        from ..parity import load_reference, prepare_reference
        from ..parity_metrics import parse_thresholds

        if precision not in target.thresholds:
            raise QuantizationError(f"target profile {target.name!r} has no [thresholds.{precision}] table to "
                                    "measure against (see docs/parity.md)")
        table = dict(target.thresholds[precision])
        if max_ppl_delta is not None:
            table["ppl_delta_pct_max"] = float(max_ppl_delta)
        self.thresholds = table
        self.checks, self.settings = parse_thresholds(table, f"targets/{target.name}.toml [thresholds.{precision}]")
        self.bundle, self.target, self.precision, self.log = bundle, target, precision, log
        t0 = time.perf_counter()
        model, tok, info = load_reference(bundle, None)
        self.ref = prepare_reference(model, tok, info, eval_text, windows, decode_steps)
        self.tok = tok
        log(f"reference: {info['eval_text']['windows']} windows of {info['eval_text']['window_len']} tokens from "
            f"{info['eval_text']['source']} (ppl {info['eval_text']['ppl']:.3f}), {decode_steps} decode steps x "
            f"{len(self.ref.prompts)} prompts ({time.perf_counter() - t0:.1f} s)")

    def measure(self, model_path, precision: str | None = None) -> dict:
        from ..parity import actual_precision, compare
        from ..parity_metrics import check
        from ..runtime import load_model_file

        precision = precision or self.precision
        t0 = time.perf_counter()
        session = load_model_file(model_path, self.bundle.model_config, self.target, precision, tokenizer=self.tok)
        metrics, _ = compare(session, self.ref, self.settings["near_tie_margin"])
        failures = check(metrics, self.checks)
        return {"status": "fail" if failures else "pass", "reason": "; ".join(failures),
                "metrics": {k: metrics.get(k) for k in KEEP}, "thresholds": self.thresholds,
                "actual_precision": actual_precision(session, precision),
                "eval_text": self.ref.info["eval_text"], "seconds": round(time.perf_counter() - t0, 2)}
