"""Parity metrics on logits (numpy only) and the threshold rules that turn them into a verdict.

`LogitStats` accumulates, chunk by chunk, how far a candidate's logits (B*T, vocab) are from the
reference's: element-wise absolute error, per-position cosine, top-1 / top-5 agreement, KL(reference ||
candidate) per position in nats, perplexity of both on target tokens, non-finite values, and "near ties"
(positions where the reference's top-2 margin is so small that a top-1 flip there is explained by noise).
Everything is computed in float64 from the float32/float16 inputs.

Thresholds (targets/*.toml, `[thresholds.PRECISION]`) are `<metric>_max` (metric must be <= limit) or
`<metric>_min` (metric must be >= limit), where <metric> is a key of the metrics dict; two further keys are
settings, not checks: `near_tie_margin` and `first_divergence_rel_err`. See docs/parity.md.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError

# Metrics a threshold may name (numeric entries of a result's `metrics`).
CHECKABLE = ("max_abs", "mean_abs", "cosine", "top1_agreement", "top5_overlap", "kl_mean", "kl_p99", "ppl",
             "ppl_delta_pct", "greedy_agreement", "greedy_match_steps", "nonfinite")
SETTINGS = {"near_tie_margin": 1e-3, "first_divergence_rel_err": None}
# Relative hidden-state error (||h - h_ref|| / ||h_ref||) that counts as "left tolerance" when no
# first_divergence_rel_err is set for a precision.
DEFAULT_HIDDEN_REL_ERR = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 2e-2, "int8": 5e-2}
FALLBACK_HIDDEN_REL_ERR = 0.1
HIST_EDGES = np.concatenate(([0.0], np.logspace(-9, 3, 49)))  # absolute-error histogram bins


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


class LogitStats:
    """Streaming comparison of reference and candidate logits; `summary()` gives the metrics dict."""

    def __init__(self, near_tie_margin: float = SETTINGS["near_tie_margin"]):
        self.margin = near_tie_margin
        self.max_abs, self.sum_abs, self.n_elems, self.nonfinite = 0.0, 0.0, 0, 0
        self.hist = np.zeros(len(HIST_EDGES) - 1, dtype=np.int64)
        self.kl, self.cos, self.top1, self.top5, self.ref_margin = [], [], [], [], []
        self.nll_ref, self.nll_cand = [], []

    def update(self, ref: np.ndarray, cand: np.ndarray, targets: np.ndarray | None = None) -> np.ndarray:
        """ref, cand (..., vocab); targets (...) token ids for perplexity. Returns per-position KL."""
        if ref.shape != cand.shape:
            raise ValueError(f"logit shapes differ: reference {ref.shape}, candidate {cand.shape}")
        v = ref.shape[-1]
        ref = ref.reshape(-1, v).astype(np.float64)
        cand = cand.reshape(-1, v).astype(np.float64)
        finite = np.isfinite(cand)
        self.nonfinite += int(cand.size - finite.sum())
        err = np.abs(cand - ref)[finite]
        if err.size:
            self.max_abs = max(self.max_abs, float(err.max()))
            self.sum_abs += float(err.sum())
            self.n_elems += err.size
            self.hist += np.histogram(np.clip(err, 0.0, HIST_EDGES[-1]), HIST_EDGES)[0]
        lp_ref, lp_cand = log_softmax(ref), log_softmax(cand)
        with np.errstate(invalid="ignore"):
            kl = np.maximum(np.sum(np.exp(lp_ref) * (lp_ref - lp_cand), axis=-1), 0.0)  # (N,); >= 0 up to rounding
            norms = np.linalg.norm(ref, axis=-1) * np.linalg.norm(cand, axis=-1)
            cos = np.sum(ref * cand, axis=-1) / np.maximum(norms, 1e-30)
        self.kl.append(kl)
        self.cos.append(cos)
        ref_top = np.argsort(-ref, axis=-1)[:, :5]
        cand_top = np.argsort(-np.where(np.isfinite(cand), cand, -np.inf), axis=-1)[:, :5]
        self.top1.append(ref_top[:, 0] == cand_top[:, 0])
        self.top5.append(np.array([len(set(a) & set(b)) / len(a) for a, b in zip(ref_top, cand_top)]))
        srt = np.sort(ref, axis=-1)
        self.ref_margin.append(srt[:, -1] - srt[:, -2] if v > 1 else np.full(len(ref), np.inf))
        if targets is not None:
            t = np.asarray(targets).reshape(-1)
            rows = np.arange(len(t))
            self.nll_ref.append(-lp_ref[rows, t])
            self.nll_cand.append(-lp_cand[rows, t])
        return kl

    def summary(self) -> dict:
        if not self.kl:
            raise ValueError("no positions compared")
        kl, cos = np.concatenate(self.kl), np.concatenate(self.cos)
        top1, margin = np.concatenate(self.top1), np.concatenate(self.ref_margin)
        near = margin < self.margin
        m = {
            "max_abs": self.max_abs if self.n_elems else None,
            "mean_abs": self.sum_abs / self.n_elems if self.n_elems else None,
            "cosine": _finite_or_none(np.mean(cos)),
            "top1_agreement": float(top1.mean()),
            "top5_overlap": float(np.concatenate(self.top5).mean()),
            "kl_mean": _finite_or_none(np.mean(kl)),
            "kl_p99": _finite_or_none(np.percentile(kl, 99)) if np.isfinite(kl).all() else None,
            "nonfinite": self.nonfinite,
            "positions": int(len(kl)),
            "near_ties": {"margin": self.margin, "count": int(near.sum()),
                          "top1_disagreements": int((~top1).sum()),
                          "top1_disagreements_on_near_ties": int((~top1 & near).sum())},
        }
        if self.nll_ref:
            ppl_ref = math.exp(float(np.mean(np.concatenate(self.nll_ref))))
            ppl = _finite_or_none(math.exp(min(float(np.mean(np.concatenate(self.nll_cand))), 700.0)))
            m.update(ppl=ppl, ppl_reference=ppl_ref,
                     ppl_delta_pct=None if ppl is None else 100.0 * (ppl - ppl_ref) / ppl_ref)
        return m

    def histogram(self) -> dict:
        return {"edges": HIST_EDGES.tolist(), "counts": self.hist.tolist()}


def merge_stats(*stats: LogitStats) -> LogitStats:
    """One LogitStats holding every position of the given ones (e.g. eval windows + decode steps)."""
    out = LogitStats(stats[0].margin)
    for s in stats:
        out.max_abs = max(out.max_abs, s.max_abs)
        out.sum_abs += s.sum_abs
        out.n_elems += s.n_elems
        out.nonfinite += s.nonfinite
        out.hist += s.hist
        for name in ("kl", "cos", "top1", "top5", "ref_margin", "nll_ref", "nll_cand"):
            getattr(out, name).extend(getattr(s, name))
    return out


def greedy_match(ref_tokens: list[int], cand_logits: np.ndarray) -> int:
    """Leading steps on which the candidate's argmax equals the reference's greedy token."""
    for n, (tok, row) in enumerate(zip(ref_tokens, cand_logits)):
        if not np.isfinite(row).all() or int(np.argmax(row)) != int(tok):
            return n
    return len(ref_tokens)


# --- thresholds ------------------------------------------------------------------------------------
def parse_thresholds(table: dict, where: str) -> tuple[list[tuple[str, str, float]], dict]:
    """[thresholds.PRECISION] -> ([(metric, 'max'|'min', limit)], settings). Every problem reported at once."""
    checks, settings, problems = [], dict(SETTINGS), []
    for key, value in table.items():
        if key in SETTINGS:
            settings[key] = value
            continue
        metric, _, bound = key.rpartition("_")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key} must be a number (got {value!r})")
        elif bound in ("max", "min") and metric in CHECKABLE:
            checks.append((metric, bound, float(value)))
        elif key in CHECKABLE:
            problems.append(f"{key!r} needs a direction: write {key}_max or {key}_min")
        else:
            problems.append(f"unknown threshold {key!r} (use <metric>_max or <metric>_min with metric one of "
                            f"{', '.join(CHECKABLE)}; settings: {', '.join(SETTINGS)})")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    return checks, settings


def check(metrics: dict, checks: list[tuple[str, str, float]]) -> list[str]:
    """Failure messages (empty = pass). Non-finite logits always fail, whatever the thresholds."""
    failures = []
    if metrics.get("nonfinite"):
        failures.append(f"{metrics['nonfinite']} non-finite logits (NaN/Inf)")
    for metric, bound, limit in checks:
        value = metrics.get(metric)
        if value is None:
            failures.append(f"{metric} is not finite (limit {metric}_{bound} = {limit:g})")
        elif (bound == "max" and value > limit) or (bound == "min" and value < limit):
            failures.append(f"{metric} = {value:.4g} {'>' if bound == 'max' else '<'} {metric}_{bound} {limit:g}")
    return failures
