"""Recipes: model, tokenizer and training settings as validated dataclasses.

A recipe is a TOML file with the sections [model], [tokenizer] and [training]. Every key is checked
against the dataclasses below; unknown keys, wrong types and bad values are all collected and reported
together in one ConfigError. `--set section.key=value` overrides a key from the CLI.

Torch-free: the runtime reads model configs from bundle manifests through this module.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import ConfigError

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


@dataclass
class ModelConfig:
    """Architecture of the decoder-only transformer (see toolkit/model.py)."""

    vocab_size: int = 2048
    context_len: int = 256  # maximum positions (prompt + generated)
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = same as n_heads (plain multi-head); fewer = grouped-query attention
    pos_encoding: Literal["learned", "sinusoidal", "rope"] = "rope"
    rope_theta: float = 10000.0
    norm_placement: Literal["pre", "post"] = "pre"
    norm_type: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    ffn_type: Literal["gelu", "gelu_tanh", "relu", "swiglu"] = "gelu"  # gelu_tanh: tanh-approximate GELU (GPT-2)
    ffn_mult: float = 4.0  # hidden width = ffn_mult * d_model (rounded), unless d_ff is set
    d_ff: int = 0
    n_experts: int = 0  # 0 = dense feed-forward; >= 2 = mixture of experts
    top_k: int = 2
    router_noise: float = 1.0  # scale of the learned Gaussian router noise (training only)
    aux_loss_coef: float = 0.01  # weight of the load-balancing loss
    attn_bias: bool = False  # biases on Q/K/V projections
    proj_bias: bool = False  # biases on the attention output and feed-forward projections
    tie_embeddings: bool = True
    dropout: float = 0.0

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        return self.d_ff or int(round(self.ffn_mult * self.d_model))

    def problems(self) -> list[str]:
        p = []
        for name in ("vocab_size", "context_len", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                p.append(f"model.{name} must be >= 1 (got {getattr(self, name)})")
        if self.n_heads >= 1 and self.d_model % self.n_heads:
            p.append(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if self.n_kv_heads < 0 or (self.n_kv_heads and self.n_heads % self.n_kv_heads):
            p.append(f"model.n_kv_heads ({self.n_kv_heads}) must divide model.n_heads ({self.n_heads}); 0 means n_heads")
        if self.pos_encoding == "rope" and self.n_heads >= 1 and self.head_dim % 2:
            p.append(f"rope needs an even head dimension (d_model / n_heads = {self.head_dim})")
        if self.ffn_hidden < 1:
            p.append("model.ffn_mult or model.d_ff must give a feed-forward width >= 1")
        if self.n_experts == 1 or self.n_experts < 0:
            p.append(f"model.n_experts must be 0 (dense) or >= 2 (got {self.n_experts})")
        if self.n_experts >= 2 and not 1 <= self.top_k <= self.n_experts:
            p.append(f"model.top_k ({self.top_k}) must be between 1 and n_experts ({self.n_experts})")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"model.dropout must be in [0, 1) (got {self.dropout})")
        if self.norm_eps <= 0:
            p.append("model.norm_eps must be > 0")
        return p


@dataclass
class TokenizerConfig:
    vocab_size: int = 2048  # the model's vocab_size follows the trained tokenizer
    min_frequency: int = 2

    def problems(self) -> list[str]:
        return [] if self.vocab_size >= 300 else [f"tokenizer.vocab_size must be >= 300 (256 bytes + specials), got {self.vocab_size}"]


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    val_fraction: float = 0.05
    seed: int = 1337
    threads: int = 0  # 0 = torch default

    def problems(self) -> list[str]:
        p = []
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "save_every"):
            if getattr(self, name) < 1:
                p.append(f"training.{name} must be >= 1 (got {getattr(self, name)})")
        if self.lr <= 0:
            p.append("training.lr must be > 0")
        if not 0.0 < self.val_fraction < 0.5:
            p.append(f"training.val_fraction must be in (0, 0.5) (got {self.val_fraction})")
        if self.warmup_steps < 0:
            p.append("training.warmup_steps must be >= 0")
        return p


@dataclass
class Recipe:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    training: TrainConfig = field(default_factory=TrainConfig)

    def problems(self) -> list[str]:
        p = self.model.problems() + self.tokenizer.problems() + self.training.problems()
        if self.training.seq_len > self.model.context_len:
            p.append(f"training.seq_len ({self.training.seq_len}) exceeds model.context_len ({self.model.context_len})")
        return p

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "tokenizer": TokenizerConfig, "training": TrainConfig}


def _check_value(where: str, value, hint) -> tuple[object, str | None]:
    """Coerce value to the annotated type; returns (value, problem-or-None)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            return value, f"{where} must be one of {', '.join(map(str, choices))} (got {value!r})"
        return value, None
    if hint is bool:
        if not isinstance(value, bool):
            return value, f"{where} must be true or false (got {value!r})"
        return value, None
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return value, f"{where} must be an integer (got {value!r})"
        return value, None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"{where} must be a number (got {value!r})"
        return float(value), None
    if hint is str:
        if not isinstance(value, str):
            return value, f"{where} must be a string (got {value!r})"
    return value, None


def build_section(cls, values: dict, section: str, problems: list[str]):
    """Build one config dataclass from a dict, appending every problem found to `problems`."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            problems.append(f"unknown key {section}.{key} (known: {', '.join(sorted(known))})")
            continue
        value, problem = _check_value(f"{section}.{key}", value, hints[key])
        if problem:
            problems.append(problem)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def model_config_from_dict(values: dict) -> ModelConfig:
    """Parse and validate a model config (from config.json or a bundle manifest)."""
    problems: list[str] = []
    cfg = build_section(ModelConfig, values, "model", problems)
    problems += cfg.problems()
    if problems:
        raise ConfigError("invalid model config: " + "; ".join(problems))
    return cfg


def parse_override(text: str) -> tuple[str, str, object]:
    """'training.lr=1e-3' -> ('training', 'lr', 0.001). Values are parsed as TOML, else taken as strings."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    if key.count(".") != 1:
        raise ConfigError(f"--set key must look like section.key (e.g. training.lr), got {key!r}")
    section, name = key.strip().split(".")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, name, value


def resolve_recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        return path
    candidate = MODELS_DIR / f"{name_or_path}.toml"
    if not candidate.is_file():
        known = sorted(p.stem for p in MODELS_DIR.glob("*.toml"))
        raise ConfigError(f"unknown recipe {name_or_path!r}; known recipes: {', '.join(known)} (or give a .toml path)")
    return candidate


def load_recipe(name_or_path: str, overrides: list[str] | tuple = ()) -> Recipe:
    """Load a recipe by name (models/NAME.toml) or path, apply --set overrides, validate everything."""
    path = resolve_recipe_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return recipe_from_dict(data, overrides, default_name=path.stem)


def recipe_from_dict(data: dict, overrides=(), default_name: str = "custom") -> Recipe:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    problems: list[str] = []
    for text in overrides:
        section, name, value = parse_override(text)
        if section not in SECTIONS:
            problems.append(f"--set {text}: unknown section {section!r} (known: {', '.join(SECTIONS)})")
            continue
        data.setdefault(section, {})[name] = value
    name = data.pop("name", default_name)
    sections = {}
    for key, value in data.items():
        if key not in SECTIONS:
            problems.append(f"unknown section [{key}] (known: name, {', '.join(SECTIONS)})")
        elif not isinstance(value, dict):
            problems.append(f"[{key}] must be a table")
        else:
            sections[key] = build_section(SECTIONS[key], value, key, problems)
    recipe = Recipe(name=str(name), **{k: sections.get(k, cls()) for k, cls in SECTIONS.items()})
    problems += recipe.problems()
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in recipe: " + "; ".join(problems))
    return recipe


def read_json(path: Path, what: str, error=ConfigError) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{what} is not valid JSON ({path}): {exc}") from None
