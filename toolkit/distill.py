"""Knowledge distillation: train a student recipe to match a larger teacher's next-token distribution.

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, next token)

where x_T = softmax(logits / T); the KL is summed over the vocabulary and averaged over positions, and the
T^2 factor keeps the soft-target gradients on the scale of the hard-target ones (Hinton et al., 2015). A
mixture-of-experts student also adds its load-balancing loss.

The loop is toolkit/train.py's `train` with a distillation `loss_fn`, so checkpoints, atomic saves, bit-exact
`--resume` and torchrun data parallelism behave exactly as in `edgekit train`. The teacher (a toolkit
checkpoint or a local Hugging Face folder, through sources.load_reference) runs in eval mode without
gradients on the same batch as the student.

Tokenizer: the student adopts the teacher's tokenizer, so its vocab_size is the teacher's and the recipe's
[tokenizer] section is ignored; an explicit --set model.vocab_size / tokenizer.vocab_size that differs from
the teacher's is refused. Documents are separated by the teacher's end-of-text token.

Top-k teacher cache (`top_k_cache` = K > 0): instead of the full distribution, the teacher's K largest
logits per position are kept and the KL is taken over those K tokens, teacher and student both
renormalised over them: the KL shapes the student's distribution among the teacher's K candidates and the
cross-entropy term alone governs the rest of the vocabulary. (Comparing the renormalised teacher with the
student's full-vocabulary log-probabilities instead — the first version — asks the student to put all its
mass on K tokens; on WikiText-2 that made the distilled `small` worse than one trained from scratch, test
perplexity 702 vs 205; renormalised: 182, full logits 179.) They are cached on disk, one safetensors file per
(step, rank) in `cache_dir` (default OUT/teacher-cache), holding int32 ids, float32 logits and a digest of
the input ids. Batches are a pure function of (seed, step), so a resumed run, or another student distilled
from the same teacher with the same data settings (give them the same --cache-dir), reads the teacher's
logits instead of running it again; a file whose input digest differs is recomputed. cache.json records the
teacher's content hash and K, and a cache for another teacher or K is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import Recipe, parse_override
from .errors import ConfigError, DataError

DEFAULT_ALPHA, DEFAULT_TEMPERATURE = 0.5, 2.0


# --- losses ----------------------------------------------------------------------------------------
def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher_T || student_T) summed over the vocabulary, averaged over all positions. (..., V) inputs."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def topk_kl_divergence(student_logits, top_values, top_indices, temperature: float = 1.0) -> torch.Tensor:
    """KL over the teacher's top-k tokens, teacher and student both renormalised over those k tokens."""
    s = F.log_softmax(student_logits.float().gather(-1, top_indices.long()) / temperature, dim=-1)
    t = F.log_softmax(top_values.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def distillation_loss(student_logits, targets, alpha: float, temperature: float, teacher_logits=None,
                      top_values=None, top_indices=None):
    """(loss, ce, kl): alpha * T^2 * KL + (1 - alpha) * CE, with the full teacher logits or its top-k."""
    ce = F.cross_entropy(student_logits.flatten(0, -2).float(), targets.flatten())
    if teacher_logits is not None:
        kl = kl_divergence(student_logits, teacher_logits, temperature)
    else:
        kl = topk_kl_divergence(student_logits, top_values, top_indices, temperature)
    return alpha * temperature**2 * kl + (1 - alpha) * ce, ce, kl


# --- teacher signal (optionally cached top-k) -----------------------------------------------------
def teacher_fingerprint(source: str | Path) -> str:
    """sha256 over the teacher's config.json and weight files (content, not path or mtime)."""
    from . import checkpoint, hf

    folder = Path(source) if hf.is_hf_dir(source) else checkpoint.resolve(source)
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.name == "config.json" or p.suffix in (".safetensors", ".bin")))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


class TopKCache:
    """Per-(step, rank) files of the teacher's top-k logits; see the module docstring."""

    def __init__(self, folder: Path, fingerprint: str, k: int, rank: int, world: int, check_now: bool = True):
        self.folder, self.k, self.rank, self.world = Path(folder), k, rank, world
        self.key, self.ready, self.synced = {"teacher_sha256": fingerprint, "top_k": k}, False, world == 1
        if check_now and (self.folder / "cache.json").is_file():
            self._open()  # refuse a foreign cache before training starts

    def _open(self):
        """Check or write cache.json; done lazily, since a fresh run clears OUT (the default location) first."""
        self.folder.mkdir(parents=True, exist_ok=True)
        key, path = self.key, self.folder / "cache.json"
        if path.is_file():
            try:
                found = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                found = None
            if found != key:
                raise ConfigError(f"{self.folder} holds a teacher cache for another teacher or --top-k-cache ({found}); "
                                  f"use another --cache-dir or delete it")
        else:
            self._write_json(path, key)
        self.ready = True

    def _write_json(self, path: Path, data: dict):
        tmp = path.with_name(f".{path.name}-{os.getpid()}")
        tmp.write_text(json.dumps(data) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def get(self, step: int, x: torch.Tensor, compute):
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import save_file

        if not self.synced:  # torchrun: wait until rank 0 has cleared OUT (a fresh run) before writing into it
            torch.distributed.barrier()
            self.synced = True
        if not self.ready:
            self._open()
        digest = hashlib.sha256(x.numpy().tobytes() + str(tuple(x.shape)).encode()).hexdigest()
        path = self.folder / f"step-{step:06d}-rank{self.rank}of{self.world}.safetensors"
        if path.is_file():
            try:
                with safe_open(str(path), "pt") as f:
                    if (f.metadata() or {}).get("input_sha256") == digest:
                        return f.get_tensor("values"), f.get_tensor("indices")
            except (SafetensorError, OSError):
                pass  # unreadable: recompute and replace
        values, indices = compute(x).float().topk(self.k, dim=-1)
        values, indices = values.contiguous(), indices.to(torch.int32).contiguous()
        tmp = path.with_name(f".{path.name}-{os.getpid()}")
        save_file({"values": values, "indices": indices}, str(tmp), metadata={"input_sha256": digest})
        os.replace(tmp, path)
        return values, indices


def make_loss_fn(teacher, alpha: float, temperature: float, cache: TopKCache | None = None):
    """A train.py loss_fn: (student output, x, y, step) -> (loss, ce, {"kl", "distill_loss"})."""

    @torch.no_grad()
    def teacher_logits(x):
        return teacher(x).logits

    def loss_fn(out, x, y, step):
        if cache is None:
            loss, ce, kl = distillation_loss(out.logits, y, alpha, temperature, teacher_logits=teacher_logits(x))
        else:
            values, indices = cache.get(step, x, teacher_logits)
            loss, ce, kl = distillation_loss(out.logits, y, alpha, temperature, top_values=values, top_indices=indices)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        return loss, ce, {"kl": kl.detach(), "distill_loss": loss.detach()}

    return loss_fn


@torch.no_grad()
def mean_kl(student, teacher, tokens, seq_len: int, batch_size: int, max_batches: int | None = None,
            temperature: float = 1.0) -> float:
    """Mean per-position KL(teacher || student) over non-overlapping windows of `tokens`."""
    import numpy as np

    from .data import eval_windows

    windows = [w[0] for w in eval_windows(tokens, seq_len, None if max_batches is None else max_batches * batch_size)]
    if not windows:
        raise DataError(f"evaluation text is shorter than one window of {seq_len + 1} tokens")
    total = 0.0
    for i in range(0, len(windows), batch_size):
        x = torch.from_numpy(np.stack(windows[i : i + batch_size]))
        total += kl_divergence(student(x).logits, teacher(x).logits, temperature).item() * len(x)
    return total / len(windows)


# --- the command -----------------------------------------------------------------------------------
def _check_vocab_overrides(overrides, vocab: int):
    for text in overrides:
        section, name, value = parse_override(text)
        if name == "vocab_size" and section in ("model", "tokenizer") and value != vocab:
            raise ConfigError(f"--set {text}: the student uses the teacher's tokenizer, whose vocabulary is {vocab} "
                              f"tokens; drop the override (or set it to {vocab})")


def distill(recipe: Recipe, teacher: str | Path, out: str | Path, corpus: str | None = None,
            alpha: float | None = None, temperature: float | None = None, top_k_cache: int | None = None,
            cache_dir: str | Path | None = None, resume: bool = False, overwrite: bool = False,
            progress: bool = True, overrides=()) -> Path:
    """Distil `teacher` into a fresh student built from `recipe`; returns the final checkpoint folder.
    alpha / temperature / top_k_cache default to the resumed run's values, else 0.5 / 2.0 / 0 (off).
    `overrides`: the --set strings the recipe was built with (checked against the teacher's vocabulary)."""
    from . import checkpoint
    from .data import load_documents, split, tokenize_documents
    from .hf import eos_id, special_tokens
    from .sources import load_reference
    from .train import evaluate, setup_distributed, train

    out = Path(out)
    previous = {}
    if resume and (out / "run.json").is_file():
        previous = json.loads((out / "run.json").read_text(encoding="utf-8")).get("distill")
        if previous is None:
            raise ConfigError(f"--resume: {out} is not a distillation run (run.json has no 'distill' section)")
    alpha = previous.get("alpha", DEFAULT_ALPHA) if alpha is None else alpha
    temperature = previous.get("temperature", DEFAULT_TEMPERATURE) if temperature is None else temperature
    top_k_cache = previous.get("top_k_cache", 0) if top_k_cache is None else top_k_cache
    problems = []
    if not 0.0 <= alpha <= 1.0:
        problems.append(f"--alpha must be in [0, 1] (got {alpha})")
    if not temperature > 0:
        problems.append(f"--temperature must be > 0 (got {temperature})")
    if top_k_cache < 0:
        problems.append(f"--top-k-cache must be >= 0 (got {top_k_cache})")
    if problems:
        raise ConfigError("; ".join(problems))

    teacher_model, tok = load_reference(teacher)
    teacher_model.eval().requires_grad_(False)
    tcfg, tc = teacher_model.cfg, recipe.training
    vocab = tcfg.vocab_size
    _check_vocab_overrides(overrides, vocab)
    if tok.get_vocab_size() != vocab:
        raise ConfigError(f"teacher {teacher}: tokenizer has {tok.get_vocab_size()} tokens but the model {vocab} logits")
    if top_k_cache > vocab:
        raise ConfigError(f"--top-k-cache ({top_k_cache}) exceeds the teacher's vocabulary ({vocab})")
    if tc.seq_len > tcfg.context_len:
        raise ConfigError(f"training.seq_len ({tc.seq_len}) exceeds the teacher's context_len ({tcfg.context_len})")
    eos = eos_id(teacher, tok)
    if eos is None:
        raise DataError(f"teacher {teacher}: its tokenizer has no end-of-text token to separate documents")
    recipe.model.vocab_size = recipe.tokenizer.vocab_size = vocab

    fingerprint = teacher_fingerprint(teacher)
    settings = {"teacher": str(teacher), "teacher_sha256": fingerprint, "alpha": alpha, "temperature": temperature,
                "top_k_cache": top_k_cache}
    changed = [k for k in ("teacher_sha256", "alpha", "temperature", "top_k_cache") if k in previous and previous[k] != settings[k]]
    if changed:
        raise ConfigError(f"--resume: {', '.join(changed)} differ(s) from the run in {out}; use the run's settings "
                          f"or start a new run")

    ddp = setup_distributed()
    cache = None
    if top_k_cache:
        # the default location inside OUT is cleared by a fresh run, so only an existing run's is checked up front
        cache = TopKCache(Path(cache_dir) if cache_dir else out / "teacher-cache", fingerprint, top_k_cache,
                          ddp.rank, ddp.world, check_now=resume or cache_dir is not None)
    loss_fn = make_loss_fn(teacher_model, alpha, temperature, cache)
    ckpt = train(recipe, out, corpus=corpus, resume=resume, overwrite=overwrite, progress=progress,
                 loss_fn=loss_fn, tokenizer=tok, eos_id=eos,
                 extra_meta={"distill": settings, "special_tokens": special_tokens(teacher, tok)})

    if ddp.main:  # summary on the validation split: how close the student got to the teacher
        run = json.loads((out / "run.json").read_text(encoding="utf-8"))
        tokens = tokenize_documents(tok, load_documents(run.get("corpus")), eos)
        _, val = split(tokens, tc.val_fraction, tc.seq_len)
        student, _, _ = checkpoint.load(ckpt)
        summary = {"checkpoint": str(ckpt), **settings,
                   "val_kl": round(mean_kl(student, teacher_model, val, tc.seq_len, tc.batch_size, tc.eval_batches), 5),
                   "val_loss_student": round(evaluate(student, val, tc.seq_len, tc.batch_size, tc.eval_batches), 5),
                   "val_loss_teacher": round(evaluate(teacher_model, val, tc.seq_len, tc.batch_size, tc.eval_batches), 5)}
        (out / "distill.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return ckpt
