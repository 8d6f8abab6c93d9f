"""Checkpoints: config.json + model.safetensors + tokenizer.json (+ train_state.pt when training).

A training run directory holds `step-NNNNNN/` checkpoint folders and a `latest` pointer file. A save
writes a hidden temporary folder, fsyncs it, renames it into place and only then moves the pointer
(atomic replace), so a process killed mid-save leaves the previous checkpoint and pointer intact.
Weights load only from safetensors; the training state loads with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from .config import ModelConfig, model_config_from_dict, read_json
from .errors import CheckpointError, ConfigError
from .model import Transformer
from .tokenizer import load_tokenizer

CHECKPOINT_FORMAT = "edgekit-checkpoint/1"
STEP_DIR = re.compile(r"^step-\d{6,}$")
KEEP = 2  # checkpoints kept in a run directory


def is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def resolve(path: str | Path) -> Path:
    """A checkpoint folder itself, or a run folder whose `latest` file names one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if is_checkpoint(path):
        return path
    pointer = path / "latest"
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if not STEP_DIR.match(name) or not is_checkpoint(path / name):
            raise CheckpointError(f"{pointer} names {name!r}, which is not a complete checkpoint folder")
        return path / name
    raise CheckpointError(f"{path} is not a checkpoint (needs config.json and model.safetensors) or a training run")


def read_config(ckpt: Path) -> tuple[ModelConfig, dict]:
    meta = read_json(ckpt / "config.json", "checkpoint config", CheckpointError)
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{ckpt / 'config.json'} has no 'model' section")
    try:
        return model_config_from_dict(meta["model"]), meta
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt / 'config.json'}: {exc}") from None


def load(path: str | Path) -> tuple[Transformer, "Tokenizer", Path]:  # noqa: F821
    """Load model (eval mode) and tokenizer from a checkpoint or run folder."""
    ckpt = resolve(path)
    cfg, _ = read_config(ckpt)
    model = Transformer(cfg)
    try:
        missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{ckpt / 'model.safetensors'} is unreadable or truncated: {exc}") from None
    except RuntimeError as exc:  # shape mismatch between config and tensors
        first = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{ckpt}: config.json does not match model.safetensors ({first})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: config.json does not match model.safetensors (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    tok = load_tokenizer(ckpt / "tokenizer.json")
    if tok.get_vocab_size() != cfg.vocab_size:
        raise CheckpointError(f"{ckpt}: tokenizer has {tok.get_vocab_size()} tokens, model expects {cfg.vocab_size}")
    return model.eval(), tok, ckpt


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(folder: Path, model: Transformer, tok, meta: dict, train_state: dict | None = None):
    """Write a checkpoint into `folder` (which must not exist), atomically: temp folder + rename."""
    folder = Path(folder)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = {"format": CHECKPOINT_FORMAT, **meta, "model": model.cfg.__dict__.copy()}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        save_model(model, str(tmp / "model.safetensors"))
        tok.save(str(tmp / "tokenizer.json"))
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
        _fsync_dir(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_run_checkpoint(run_dir: Path, step: int, model, tok, meta: dict, train_state: dict):
    """Save step-NNNNNN/ in a run folder, then move the `latest` pointer, then prune old checkpoints."""
    name = f"step-{step:06d}"
    write_checkpoint(run_dir / name, model, tok, meta, train_state)
    pointer_tmp = run_dir / f".latest-{os.getpid()}"
    pointer_tmp.write_text(name + "\n", encoding="utf-8")
    os.replace(pointer_tmp, run_dir / "latest")
    _fsync_dir(run_dir)
    old = sorted(p for p in run_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name))
    for p in old[:-KEEP]:
        shutil.rmtree(p)


def load_train_state(ckpt: Path) -> dict:
    path = ckpt / "train_state.pt"
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no train_state.pt; it cannot be resumed (use it with --init to fine-tune)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is unreadable: {exc}") from None
