"""Next-token training: AdamW, warm-up + cosine decay, gradient clipping, periodic validation,
progress bar, JSONL metrics, atomic checkpoints, bit-exact resume and torchrun data parallelism.

Data parallelism: under `torchrun --nproc_per_node N -m toolkit train ...` each rank takes an
interleaved 1/N slice of the same global batch (training.batch_size), gradients are averaged by
DistributedDataParallel (gloo on CPU, nccl on GPU), and only rank 0 writes files.

Other objectives (distillation, toolkit/distill.py) reuse this loop through keyword hooks of `train`:
`loss_fn` replaces the next-token loss, `tokenizer` replaces training one, `eos_id` sets the document
separator, `extra_meta` is recorded in run.json and every checkpoint's config.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint
from .config import Recipe, TrainConfig
from .data import eval_windows, get_batch, load_documents, split, tokenize_documents
from .errors import CheckpointError, ConfigError, DataError
from .model import Transformer
from .tokenizer import EOS, train_tokenizer


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up to tc.lr, then cosine decay to tc.lr * tc.min_lr_ratio at tc.steps."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def next_token_loss(out, x: torch.Tensor, y: torch.Tensor, step: int):
    """The default objective: next-token cross-entropy (+ the MoE load-balancing loss).
    A loss_fn returns (loss to minimise, cross-entropy for logging, {extra metric name: float})."""
    ce = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())
    loss = ce if out.aux_loss is None else ce + out.aux_loss
    return loss, ce, {}


def make_optimizer(model: Transformer, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2))


@torch.no_grad()
def evaluate(model: Transformer, tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None) -> float:
    """Mean next-token cross-entropy over non-overlapping windows of `tokens`."""
    was_training = model.training
    model.eval()
    total, count, batch = 0.0, 0, []
    max_windows = None if max_batches is None else max_batches * batch_size
    windows = list(eval_windows(tokens, seq_len, max_windows))
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        x = torch.from_numpy(np.stack([w[0] for w in chunk]))
        y = torch.from_numpy(np.stack([w[1] for w in chunk]))
        logits = model(x).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    if count == 0:
        raise DataError(f"evaluation text is shorter than one window of {seq_len + 1} tokens")
    return total / count


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def prepare_out_dir(out: Path, resume: bool, overwrite: bool):
    if resume:
        if not out.exists():
            raise CheckpointError(f"--resume: {out} does not exist")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(
                f"{out} already holds files (a previous run?); pass --resume to continue it or --overwrite to replace it"
            )


def train(recipe: Recipe, out: str | Path, corpus: str | None = None, resume: bool = False,
          overwrite: bool = False, init_from: str | None = None, progress: bool = True, *,
          loss_fn=None, tokenizer=None, eos_id: int | None = None, extra_meta: dict | None = None) -> Path:
    """Train (or resume, or fine-tune from `init_from`) and return the final checkpoint folder.

    Hooks (all optional): loss_fn(out, x, y, step) -> (loss, ce, extras), see next_token_loss;
    tokenizer: use this tokenizer for a fresh run instead of training one; eos_id: the token put between
    documents (default: the tokenizer's <|eos|>); extra_meta: merged into run.json and checkpoint meta."""
    loss_fn = loss_fn or next_token_loss
    tc = recipe.training
    out = Path(out)
    ddp = setup_distributed()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if ddp.main:
        prepare_out_dir(out, resume, overwrite)

    # --- state to start from: resume > fine-tune > fresh ----------------------------------------------
    state, start_step = None, 0
    if resume:
        ckpt = checkpoint.resolve(out)
        model, tok, _ = checkpoint.load(ckpt)
        state = checkpoint.load_train_state(ckpt)
        start_step = int(state["step"])
        run = json.loads((out / "run.json").read_text(encoding="utf-8")) if (out / "run.json").is_file() else {}
        if run.get("recipe", {}).get("training", {}).get("seed", tc.seed) != tc.seed:
            raise ConfigError(f"--resume with a different seed than the run in {out}")
        corpus = corpus if corpus is not None else run.get("corpus")
    elif init_from:
        model, tok, src = checkpoint.load(init_from)
    docs = load_documents(corpus)
    if not resume and not init_from:
        tok = tokenizer if tokenizer is not None else _train_tokenizer_once(docs, recipe, out, ddp)
        cfg = recipe.model
        cfg.vocab_size = tok.get_vocab_size()
        torch.manual_seed(tc.seed)
        model = Transformer(cfg)
    cfg = model.cfg
    if tc.seq_len > cfg.context_len:
        raise ConfigError(f"training.seq_len ({tc.seq_len}) exceeds the model's context_len ({cfg.context_len})")
    if tc.batch_size % ddp.world:
        raise ConfigError(f"training.batch_size ({tc.batch_size}) must be divisible by the {ddp.world} processes")

    tokens = tokenize_documents(tok, docs, eos_id if eos_id is not None else tok.token_to_id(EOS))
    train_tokens, val_tokens = split(tokens, tc.val_fraction, tc.seq_len)

    model.train()
    optimizer = make_optimizer(model, tc)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
    else:
        torch.manual_seed(tc.seed + 1)  # training-time randomness (dropout, router noise)
    engine = torch.nn.parallel.DistributedDataParallel(model) if ddp.world > 1 else model

    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            for p in out.iterdir():  # --overwrite: clear the previous run
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        run_info = {"recipe": recipe.to_dict(), "corpus": None if corpus is None else str(corpus),
                    "init_from": init_from, "params": model.num_params(), "world_size": ddp.world,
                    "train_tokens": int(len(train_tokens)), "val_tokens": int(len(val_tokens)), **(extra_meta or {})}
        (out / "run.json").write_text(json.dumps(run_info, indent=2) + "\n", encoding="utf-8")
        metrics_path = out / "metrics.jsonl"
        if resume and metrics_path.is_file():  # drop records logged after the checkpoint we resume from
            kept = [l for l in metrics_path.read_text(encoding="utf-8").splitlines() if json.loads(l)["step"] <= start_step]
            metrics_path.write_text("".join(l + "\n" for l in kept), encoding="utf-8")
        metrics = open(metrics_path, "a", encoding="utf-8")
    meta = {"recipe": recipe.name, "corpus": None if corpus is None else str(corpus), **(extra_meta or {})}

    def save(step):
        if ddp.main:
            train_state = {"step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                           "scheduler": {"kind": "warmup-cosine", "lr": tc.lr, "warmup_steps": tc.warmup_steps,
                                         "steps": tc.steps, "min_lr_ratio": tc.min_lr_ratio},
                           "data": {"seed": tc.seed, "next_step": step}}
            checkpoint.save_run_checkpoint(out, step, model, tok, {**meta, "step": step}, train_state)

    tokens_per_step = tc.batch_size * tc.seq_len
    interactive = sys.stderr.isatty()  # in logs (CI, nohup) redraw every 30 s instead of every step
    bar = tqdm(total=tc.steps, initial=start_step, desc=f"train {recipe.name}", disable=not (progress and ddp.main),
               unit="step", dynamic_ncols=True, mininterval=0.1 if interactive else 30.0)
    t0, window_tokens = time.perf_counter(), 0
    for step in range(start_step, tc.steps):
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(train_tokens, step, tc.batch_size, tc.seq_len, tc.seed, ddp.rank, ddp.world)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        loss, ce, extras = loss_fn(engine(x), x, y, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        window_tokens += tokens_per_step
        done = step + 1
        if not math.isfinite(ce.item()):
            raise DataError(f"training diverged at step {done} (loss {ce.item()}); try a lower training.lr")
        eval_now = done % tc.eval_every == 0 or done == tc.steps
        if ddp.main and (done % 10 == 0 or eval_now):
            elapsed = time.perf_counter() - t0
            tok_s = window_tokens / max(elapsed, 1e-9)
            bar.set_postfix(loss=f"{ce.item():.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=interactive)
            record = {"step": done, "loss": round(ce.item(), 5), "lr": lr, "grad_norm": round(float(grad_norm), 4),
                      "tok_s": round(tok_s, 1), **{k: round(float(v), 5) for k, v in extras.items()}}
            if eval_now:
                val = evaluate(model, val_tokens, tc.seq_len, tc.batch_size, tc.eval_batches)
                record.update(val_loss=round(val, 5), val_ppl=round(math.exp(val), 3))
                bar.write(f"step {done}: train loss {ce.item():.3f}  val loss {val:.3f}  val ppl {math.exp(val):.2f}  {tok_s:,.0f} tok/s")
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            t0, window_tokens = time.perf_counter(), 0
        bar.update(1)
        if done % tc.save_every == 0 or done == tc.steps:
            save(done)
    bar.close()
    if ddp.main and start_step < tc.steps:
        metrics.close()
    if ddp.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return checkpoint.resolve(out)


def _train_tokenizer_once(docs, recipe: Recipe, out: Path, ddp: Dist):
    """Rank 0 trains the tokenizer; other ranks load rank 0's file so every rank has the same ids."""
    from .tokenizer import load_tokenizer

    if ddp.world == 1:
        return train_tokenizer(docs, recipe.tokenizer.vocab_size, recipe.tokenizer.min_frequency)
    shared = out / ".tokenizer-ddp.json"
    if ddp.main:
        tok = train_tokenizer(docs, recipe.tokenizer.vocab_size, recipe.tokenizer.min_frequency)
        out.mkdir(parents=True, exist_ok=True)
        tok.save(str(shared))
    dist.barrier()
    tok = load_tokenizer(shared)
    dist.barrier()
    if ddp.main:
        shared.unlink()
    return tok
