"""Hugging Face interoperability: import local GPT-2 / Llama / Qwen2 folders, export llama-style checkpoints.

Import reads a local folder written by `save_pretrained` — config.json, weights (model.safetensors,
sharded model-*.safetensors with an index, or pytorch_model.bin loaded only with
torch.load(weights_only=True)) and tokenizer.json — and builds the toolkit Transformer directly from the
files. transformers itself is not needed (and nothing is ever fetched from a hub); `load_with_transformers`
is there for parity checks and loads offline only.

Architectures map onto ModelConfig as follows (one mapper per architecture, registered in ARCHITECTURES):
  GPT2LMHeadModel   learned positions, pre-LayerNorm, GELU (gelu_new -> gelu_tanh), biases everywhere
                    (attn_bias + proj_bias), Conv1D weights stored (in, out) -> transposed, c_attn -> q/k/v.
  LlamaForCausalLM  rope (+ rope_theta), RMSNorm, SwiGLU, GQA via n_kv_heads, no biases (or attention_bias
                    and mlp_bias together -> attn_bias + proj_bias).
  Qwen2ForCausalLM  as Llama, with biases on q/k/v only (attn_bias=True, proj_bias=False).
What the toolkit model cannot express exactly (scaled rope variants, sliding-window layers, a head_dim other
than hidden_size / heads, ...) is refused with a ConfigError that names every problem.

The tokenizer is the folder's tokenizer.json. When the model has more embedding rows than the tokenizer has
tokens (HF models often pad the vocabulary), placeholder special tokens <|unused_N|> fill the gap so the
tokenizer and the logits agree on the vocabulary size, as toolkit checkpoints require.

Export writes a checkpoint whose config is llama-style (rope, pre-RMSNorm, SwiGLU, no biases, dense) as a
folder transformers loads as LlamaForCausalLM (and AutoTokenizer as a fast tokenizer).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint
from .config import ModelConfig, read_json
from .errors import CheckpointError, ConfigError, ExportError
from .model import Transformer
from .tokenizer import SPECIAL_TOKENS, load_tokenizer

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
SPECIAL_NAMES = ("bos", "eos", "pad", "unk")


# --- detection -------------------------------------------------------------------------------------
def is_hf_dir(path: str | Path) -> bool:
    """A folder whose config.json is a Hugging Face config (not a toolkit checkpoint's)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return (isinstance(meta, dict) and meta.get("format") != checkpoint.CHECKPOINT_FORMAT
            and ("architectures" in meta or "model_type" in meta))


# --- config mapping --------------------------------------------------------------------------------
def _require(c: dict, keys: tuple[str, ...], arch: str):
    missing = [k for k in keys if not isinstance(c.get(k), int) or isinstance(c.get(k), bool)]
    if missing:
        raise ConfigError(f"{arch} config.json lacks integer field(s) {', '.join(missing)}")


def _gpt2_config(c: dict, problems: list[str]) -> ModelConfig:
    _require(c, ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"), "GPT2LMHeadModel")
    act = c.get("activation_function", "gelu_new")
    ffn = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
           "gelu": "gelu", "relu": "relu"}.get(act)
    if ffn is None:
        problems.append(f"activation_function {act!r} (supported: gelu_new, gelu_pytorch_tanh, gelu_fast, gelu, relu)")
    if not c.get("scale_attn_weights", True):
        problems.append("scale_attn_weights=false (the toolkit always scales by 1/sqrt(head_dim))")
    if c.get("scale_attn_by_inverse_layer_idx"):
        problems.append("scale_attn_by_inverse_layer_idx=true")
    if c.get("add_cross_attention"):
        problems.append("add_cross_attention=true")
    return ModelConfig(
        vocab_size=c["vocab_size"], context_len=c["n_positions"], d_model=c["n_embd"], n_layers=c["n_layer"],
        n_heads=c["n_head"], pos_encoding="learned", norm_placement="pre", norm_type="layernorm",
        norm_eps=float(c.get("layer_norm_epsilon", 1e-5)), ffn_type=ffn or "gelu",
        d_ff=c.get("n_inner") or 4 * c["n_embd"], attn_bias=True, proj_bias=True,
        tie_embeddings=c.get("tie_word_embeddings", True), dropout=0.0,
    )


def _rope_decoder_config(c: dict, arch: str, problems: list[str], attn_bias: bool, proj_bias: bool) -> ModelConfig:
    """Shared by Llama and Qwen2: rope, pre-RMSNorm, SwiGLU, GQA."""
    _require(c, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"), arch)
    d, heads = c["hidden_size"], c["num_attention_heads"]
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {c.get('hidden_act')!r} (only silu, i.e. SwiGLU, is supported)")
    if c.get("head_dim") not in (None, d // heads):
        problems.append(f"head_dim {c['head_dim']} differs from hidden_size / num_attention_heads ({d // heads})")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        problems.append("per-layer rope parameters")
        rope = {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r} (only the default, unscaled rope is supported)")
    if float(rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        problems.append("partial_rotary_factor != 1")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    layer_types = c.get("layer_types") or []
    if (c.get("use_sliding_window") and c.get("sliding_window")) or any(t != "full_attention" for t in layer_types):
        problems.append("sliding-window attention layers (use_sliding_window / layer_types)")
    return ModelConfig(
        vocab_size=c["vocab_size"], context_len=c.get("max_position_embeddings") or 2048, d_model=d,
        n_layers=c["num_hidden_layers"], n_heads=heads, n_kv_heads=c.get("num_key_value_heads") or 0,
        pos_encoding="rope", rope_theta=float(theta), norm_placement="pre", norm_type="rmsnorm",
        norm_eps=float(c.get("rms_norm_eps", 1e-6)), ffn_type="swiglu", d_ff=c["intermediate_size"],
        attn_bias=attn_bias, proj_bias=proj_bias, tie_embeddings=bool(c.get("tie_word_embeddings", False)), dropout=0.0,
    )


def _llama_config(c: dict, problems: list[str]) -> ModelConfig:
    attn, mlp = bool(c.get("attention_bias", False)), bool(c.get("mlp_bias", False))
    if attn != mlp:  # the toolkit's proj_bias covers o_proj and the feed-forward together
        problems.append(f"attention_bias={attn} with mlp_bias={mlp} (the toolkit supports both or neither)")
    return _rope_decoder_config(c, "LlamaForCausalLM", problems, attn_bias=attn, proj_bias=attn)


def _qwen2_config(c: dict, problems: list[str]) -> ModelConfig:
    return _rope_decoder_config(c, "Qwen2ForCausalLM", problems, attn_bias=True, proj_bias=False)


# --- weight mapping (HF names -> toolkit names, which follow the Llama layout) -----------------------
def _gpt2_weights(sd: dict, cfg: ModelConfig) -> dict:
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    out = {"embed_tokens.weight": sd.pop("wte.weight", None), "embed_positions.weight": sd.pop("wpe.weight", None)}
    for part in ("weight", "bias"):
        out[f"norm.{part}"] = sd.pop(f"ln_f.{part}", None)
    for i in range(cfg.n_layers):
        h, t = f"h.{i}.", f"layers.{i}."
        for part in ("weight", "bias"):
            out[f"{t}input_layernorm.{part}"] = sd.pop(f"{h}ln_1.{part}", None)
            out[f"{t}post_attention_layernorm.{part}"] = sd.pop(f"{h}ln_2.{part}", None)
        w, b = sd.pop(f"{h}attn.c_attn.weight", None), sd.pop(f"{h}attn.c_attn.bias", None)
        if w is not None and b is not None:  # Conv1D stores (in, out): transpose, then split rows into q, k, v
            for name, wp, bp in zip("qkv", w.t().chunk(3, dim=0), b.chunk(3)):  # own storage: safetensors-safe
                out[f"{t}self_attn.{name}_proj.weight"], out[f"{t}self_attn.{name}_proj.bias"] = wp.contiguous(), bp.clone()
        for src, dst in (("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"), ("mlp.c_proj", "mlp.down_proj")):
            w = sd.pop(f"{h}{src}.weight", None)
            out[f"{t}{dst}.weight"] = None if w is None else w.t().contiguous()
            out[f"{t}{dst}.bias"] = sd.pop(f"{h}{src}.bias", None)
        sd.pop(f"{h}attn.bias", None), sd.pop(f"{h}attn.masked_bias", None)  # old causal-mask buffers
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd.pop("lm_head.weight")
    return {**{k: v for k, v in out.items() if v is not None}, **sd}  # leftovers surface as unexpected keys


def _llama_weights(sd: dict, cfg: ModelConfig) -> dict:
    return {k.removeprefix("model."): v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}


@dataclass(frozen=True)
class Architecture:
    config: Callable[[dict, list], ModelConfig]
    weights: Callable[[dict, ModelConfig], dict]


ARCHITECTURES = {
    "GPT2LMHeadModel": Architecture(_gpt2_config, _gpt2_weights),
    "LlamaForCausalLM": Architecture(_llama_config, _llama_weights),
    "Qwen2ForCausalLM": Architecture(_qwen2_config, _llama_weights),
}
MODEL_TYPES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def read_hf_config(folder: str | Path) -> tuple[str, ModelConfig, dict]:
    """(architecture name, ModelConfig, raw config.json) of a local HF folder; ConfigError if unsupported."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Hugging Face folder not found: {folder}")
    c = read_json(folder / "config.json", "Hugging Face config.json", CheckpointError)
    if not isinstance(c, dict):
        raise CheckpointError(f"{folder / 'config.json'} is not a JSON object")
    archs = c.get("architectures") or [MODEL_TYPES.get(c.get("model_type"), f"model_type {c.get('model_type')!r}")]
    arch = archs[0] if isinstance(archs, list) and archs else str(archs)
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{folder}: architecture {arch} is not supported; supported: {', '.join(ARCHITECTURES)}")
    problems: list[str] = []
    cfg = ARCHITECTURES[arch].config(c, problems)
    problems += cfg.problems()
    if problems:
        raise ConfigError(f"{folder}: {arch} uses what the toolkit model cannot express exactly: " + "; ".join(problems))
    return arch, cfg, c


def _inside(folder: Path, name: str) -> Path:
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise CheckpointError(f"{folder}: weight index names a file outside the folder: {name!r}")
    return path


def _load_weight_file(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path} is unreadable or truncated: {exc}") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything but plain tensors/containers
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: refused: torch.load(weights_only=True) failed ({first}); the file holds more than plain "
            f"tensors or is damaged — convert it to model.safetensors") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return sd


def read_hf_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a local HF folder, floats converted to float32."""
    folder = Path(folder)
    found = next((name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if found is None:
        raise CheckpointError(f"{folder} has no weights: expected one of {', '.join(WEIGHT_FILES)}")
    if found.endswith(".index.json"):
        index = read_json(folder / found, "weight index", CheckpointError)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{folder / found} has no 'weight_map'")
        sd = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(_load_weight_file(_inside(folder, shard)))
    else:
        sd = _load_weight_file(folder / found)
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def build_model(cfg: ModelConfig, state: dict, where: str) -> Transformer:
    """A Transformer holding exactly `state` (toolkit names); CheckpointError on missing/extra/misshapen."""
    state = dict(state)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state.get("embed_tokens.weight")
    elif "lm_head.weight" not in state:
        raise CheckpointError(f"{where}: untied output head but no lm_head.weight in the weights")
    state = {k: v for k, v in state.items() if v is not None}
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model = Transformer(cfg)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not match config.json (missing {missing[:4]}, unexpected {unexpected[:4]})")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{where}: weights do not match config.json ({first})") from None
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def load_hf_tokenizer(folder: str | Path, vocab_size: int):
    """tokenizer.json, padded with <|unused_N|> special tokens up to the model's vocab_size."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no tokenizer.json (the fast-tokenizer file the toolkit uses); with transformers installed, "
            f"AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) writes one")
    tok = load_tokenizer(path)
    n = tok.get_vocab_size()
    if n > vocab_size or max(tok.get_vocab().values(), default=-1) >= vocab_size:
        raise CheckpointError(f"{folder}: tokenizer.json has token ids beyond the model's vocab_size {vocab_size}")
    if n < vocab_size:
        tok.add_special_tokens([f"<|unused_{i}|>" for i in range(vocab_size - n)])
        if tok.get_vocab_size() != vocab_size or max(tok.get_vocab().values()) != vocab_size - 1:
            raise CheckpointError(f"{folder}: cannot pad tokenizer.json ({n} tokens) to the model's {vocab_size} rows")
    return tok


def _optional_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def hf_special_tokens(folder: str | Path, tok, hf_config: dict | None = None) -> dict[str, str | None]:
    """bos/eos/pad/unk token strings from tokenizer_config.json, special_tokens_map.json or config.json ids."""
    folder, found = Path(folder), {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = _optional_json(folder / name)
        for key in SPECIAL_NAMES:
            value = data.get(f"{key}_token")
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str) and tok.token_to_id(value) is not None:
                found.setdefault(key, value)
    for source in (hf_config or {}, _optional_json(folder / "generation_config.json")):
        for key in SPECIAL_NAMES:
            value = source.get(f"{key}_token_id")
            value = value[0] if isinstance(value, list) and value else value
            if isinstance(value, int) and tok.id_to_token(value) is not None:
                found.setdefault(key, tok.id_to_token(value))
    return {key: found.get(key) for key in SPECIAL_NAMES}


def load(folder: str | Path):
    """(Transformer in eval mode, tokenizer, info) from a local Hugging Face folder."""
    folder = Path(folder)
    arch, cfg, raw = read_hf_config(folder)
    tok = load_hf_tokenizer(folder, cfg.vocab_size)  # before the weights: fail fast on a missing file
    state = ARCHITECTURES[arch].weights(read_hf_weights(folder), cfg)
    model = build_model(cfg, state, str(folder))
    info = {"architecture": arch, "path": str(folder.resolve()), "special_tokens": hf_special_tokens(folder, tok, raw)}
    return model, tok, info


def _check_out(out: Path, overwrite: bool):
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out} already exists; pass --overwrite to replace it")


def import_hf(folder: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write a toolkit checkpoint (config.json, model.safetensors, tokenizer.json) from a local HF folder."""
    out = Path(out)
    _check_out(out, overwrite)
    model, tok, info = load(folder)
    meta = {"recipe": f"hf-{info['architecture']}", "source": {"kind": "huggingface", **info}, "step": 0,
            "special_tokens": info["special_tokens"]}
    checkpoint.write_checkpoint(out, model, tok, meta)
    return out


# --- special tokens of any source (toolkit checkpoint, imported checkpoint, HF folder) -----------------
def special_tokens(source: str | Path, tok) -> dict[str, str | None]:
    """bos/eos/pad/unk token strings of a source: an HF folder's own files; for a toolkit checkpoint the
    toolkit's <|bos|>... when its tokenizer has them, else those recorded at import/distillation."""
    if is_hf_dir(source):
        found = hf_special_tokens(source, tok, _optional_json(Path(source) / "config.json"))
    else:
        try:
            _, meta = checkpoint.read_config(checkpoint.resolve(source))
        except CheckpointError:
            meta = {}
        saved = meta.get("special_tokens") if isinstance(meta.get("special_tokens"), dict) else {}
        found = {k: v for k, v in saved.items() if isinstance(v, str) and tok.token_to_id(v) is not None}
    toolkit = {k: t for k, t in zip(SPECIAL_NAMES, SPECIAL_TOKENS) if tok.token_to_id(t) is not None}
    if not is_hf_dir(source) and len(toolkit) == len(SPECIAL_NAMES):
        found = toolkit
    return {k: found.get(k) or toolkit.get(k) for k in SPECIAL_NAMES}


def eos_id(source: str | Path, tok) -> int | None:
    name = special_tokens(source, tok)["eos"]
    return None if name is None else tok.token_to_id(name)


# --- export ----------------------------------------------------------------------------------------
LLAMA_STYLE = {"pos_encoding": "rope", "norm_placement": "pre", "norm_type": "rmsnorm", "ffn_type": "swiglu",
               "attn_bias": False, "proj_bias": False, "n_experts": 0}


def llama_style_problems(cfg: ModelConfig) -> list[str]:
    return [f"model.{k} is {getattr(cfg, k)!r} (LlamaForCausalLM needs {v!r})" for k, v in LLAMA_STYLE.items()
            if getattr(cfg, k) != v]


def export_hf(source: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write a llama-style toolkit checkpoint as a folder transformers loads as LlamaForCausalLM."""
    from safetensors.torch import save_file

    from .sources import load_reference

    out = Path(out)
    _check_out(out, overwrite)
    model, tok = load_reference(source)
    cfg = model.cfg
    problems = llama_style_problems(cfg)
    if problems:
        raise ExportError(f"{source} is not llama-style, so it has no LlamaForCausalLM equivalent: " + "; ".join(problems))
    names = special_tokens(source, tok)
    ids = {k: (None if v is None else tok.token_to_id(v)) for k, v in names.items()}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.context_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True, "torch_dtype": "float32",
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
    }
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.context_len,
                  "clean_up_tokenization_spaces": False,
                  **{f"{k}_token": v for k, v in names.items() if v is not None}}
    state = {f"model.{k}": v.detach().float().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = model.lm_head.weight.detach().float().contiguous()

    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save(str(tmp / "tokenizer.json"))
        files = {"config.json": config, "tokenizer_config.json": tok_config,
                 "special_tokens_map.json": {f"{k}_token": v for k, v in names.items() if v is not None},
                 "generation_config.json": {k: v for k, v in config.items() if k.endswith("_token_id")}}
        for name, data in files.items():
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_with_transformers(folder: str | Path):
    """(AutoModelForCausalLM in eval mode, AutoTokenizer) from a local folder — offline only, never a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ConfigError("this needs transformers (pip install 'edgekit[hf]')") from None
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a local Hugging Face folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model.eval(), tok
