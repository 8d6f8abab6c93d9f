"""Hugging Face interoperability: import parity for tiny random GPT-2 / Llama (GQA) / Qwen2 models made here
with transformers, export of a llama-style checkpoint that transformers loads with the same logits, and the
refusals (unsupported architecture or features, missing files, unsafe pytorch_model.bin).

Everything is local: models are saved into tmp_path and loaded offline; nothing needs ../shared or a network.
"""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from toolkit import checkpoint, hf
from toolkit.cli import main
from toolkit.corpus import default_corpus
from toolkit.errors import CheckpointError, ConfigError, ExportError
from toolkit.model import ModelConfig, Transformer
from toolkit.sources import load_reference
from toolkit.tokenizer import BOS, EOS, PAD, UNK, encode, train_tokenizer

TOL = 1e-4


def need_transformers():
    return pytest.importorskip("transformers", reason="HF parity tests need transformers (pip install 'edgekit[hf]')")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(default_corpus()[:200], 320)


def randomize(model, std=0.15):
    """Weights large enough that logits are O(1) and every bias / norm parameter matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name):
                p.copy_(1.0 + 0.2 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.2)
            else:
                p.normal_(0, std)
    return model


def save_hf(folder: Path, model, tok):
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(str(folder))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    wrapped.save_pretrained(str(folder))
    return folder


def make_hf(kind: str, folder: Path, tok):
    """A tiny random HF model of `kind`, saved with a tokenizer.json. Qwen2 gets 5 padded vocabulary rows."""
    t = need_transformers()
    n = tok.get_vocab_size()
    if kind == "gpt2":
        model = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=n, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                                               bos_token_id=0, eos_token_id=1))
    elif kind == "llama":  # grouped-query attention, untied head, non-default rope_theta
        model = t.LlamaForCausalLM(t.LlamaConfig(
            vocab_size=n, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=48, rope_theta=500.0, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=1))
    else:  # q/k/v biases without o_proj bias, GQA, tied head, padded vocabulary
        model = t.Qwen2ForCausalLM(t.Qwen2Config(
            vocab_size=n + 5, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=48, tie_word_embeddings=True, eos_token_id=1))
    return save_hf(folder, randomize(model).eval(), tok)


def hf_logits(folder, ids):
    ref, _ = hf.load_with_transformers(folder)
    with torch.no_grad():
        return ref(torch.tensor(ids)).logits


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_import_parity(kind, tmp_path, tok):
    folder = make_hf(kind, tmp_path / kind, tok)
    model, ktok = load_reference(folder)  # the one place commands resolve "a checkpoint"
    torch.manual_seed(1)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 20)).tolist()
    want = hf_logits(folder, ids)
    with torch.no_grad():
        got = model(torch.tensor(ids)).logits
    assert want.abs().max() > 0.5  # the comparison is not between near-zero logits
    assert (got - want).abs().max().item() <= TOL
    assert ktok.get_vocab_size() == model.cfg.vocab_size
    text = "Once upon a time, the fox"
    assert encode(ktok, text) == encode(tok, text)

    # import-hf writes a toolkit checkpoint that loads (tokenizer size == vocab) with the same logits
    assert main(["import-hf", str(folder), "--out", str(tmp_path / "ckpt")]) == 0
    imported, itok, _ = checkpoint.load(tmp_path / "ckpt")
    with torch.no_grad():
        assert (imported(torch.tensor(ids)).logits - want).abs().max().item() <= TOL
    assert itok.get_vocab_size() == imported.cfg.vocab_size
    assert main(["generate", str(folder), "Once upon", "--max-new-tokens", "3"]) == 0


def test_import_config_mapping(tmp_path, tok):
    gpt2, _, _ = hf.load(make_hf("gpt2", tmp_path / "g", tok))
    c = gpt2.cfg
    assert (c.pos_encoding, c.norm_type, c.ffn_type, c.attn_bias, c.proj_bias, c.tie_embeddings, c.d_ff) == \
        ("learned", "layernorm", "gelu_tanh", True, True, True, 128)
    llama, _, _ = hf.load(make_hf("llama", tmp_path / "l", tok))
    c = llama.cfg
    assert (c.pos_encoding, c.rope_theta, c.norm_type, c.norm_eps, c.ffn_type, c.kv_heads, c.tie_embeddings) == \
        ("rope", 500.0, "rmsnorm", 1e-5, "swiglu", 2, False)
    qwen, qtok, info = hf.load(make_hf("qwen2", tmp_path / "q", tok))
    c = qwen.cfg
    assert (c.attn_bias, c.proj_bias, c.kv_heads, c.tie_embeddings) == (True, False, 1, True)
    assert qwen.lm_head.weight is qwen.embed_tokens.weight
    assert qtok.token_to_id("<|unused_4|>") == tok.get_vocab_size() + 4
    assert info["special_tokens"]["eos"] == EOS


def test_pytorch_model_bin_parity(tmp_path, tok):
    folder = make_hf("gpt2", tmp_path / "g", tok)
    ids = [[5, 17, 42, 99, 3]]
    want = hf_logits(folder, ids)
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    model, _ = load_reference(folder)
    with torch.no_grad():
        assert (model(torch.tensor(ids)).logits - want).abs().max().item() <= TOL


# --- export ----------------------------------------------------------------------------------------
def llama_style_checkpoint(folder: Path, tok, tie: bool):
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), context_len=48, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2, pos_encoding="rope", rope_theta=1000.0, norm_type="rmsnorm", ffn_type="swiglu",
                      d_ff=48, tie_embeddings=tie)
    model = randomize(Transformer(cfg)).eval()
    checkpoint.write_checkpoint(folder, model, tok, {"recipe": "test", "step": 0})
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_export_loads_in_transformers(tie, tmp_path, tok):
    need_transformers()
    model = llama_style_checkpoint(tmp_path / "ckpt", tok, tie)
    assert main(["export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    ref, rtok = hf.load_with_transformers(tmp_path / "hf")
    assert type(ref).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        want, got = model(ids).logits, ref(ids).logits
    assert (got - want).abs().max().item() <= TOL
    text = "The little owl said hello."
    assert rtok(text)["input_ids"] == encode(tok, text)
    assert rtok.eos_token == EOS and ref.config.eos_token_id == tok.token_to_id(EOS)
    # and back again: the exported folder imports with the same logits
    back, _ = load_reference(tmp_path / "hf")
    with torch.no_grad():
        assert (back(ids).logits - want).abs().max().item() <= TOL


def test_export_refuses_non_llama_style(tmp_path, tok, capsys):
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), context_len=32, d_model=32, n_layers=1, n_heads=4,
                      pos_encoding="learned", norm_type="layernorm", ffn_type="gelu_tanh", attn_bias=True)
    checkpoint.write_checkpoint(tmp_path / "ckpt", Transformer(cfg), tok, {"recipe": "gpt", "step": 0})
    with pytest.raises(ExportError) as err:
        hf.export_hf(tmp_path / "ckpt", tmp_path / "hf")
    for what in ("pos_encoding", "norm_type", "ffn_type", "attn_bias"):
        assert what in str(err.value)
    assert "proj_bias" not in str(err.value)  # only what differs is listed
    assert not (tmp_path / "hf").exists()
    assert main(["export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 2
    assert "not llama-style" in capsys.readouterr().err


# --- refusals (no transformers needed: the HF folder is written by export_hf) -----------------------
@pytest.fixture
def llama_dir(tmp_path, tok):
    llama_style_checkpoint(tmp_path / "ckpt", tok, tie=False)
    return hf.export_hf(tmp_path / "ckpt", tmp_path / "hf")


def edit_config(folder: Path, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_detection(llama_dir, tmp_path):
    assert hf.is_hf_dir(llama_dir)
    assert not hf.is_hf_dir(tmp_path / "ckpt")  # a toolkit checkpoint is not taken for an HF folder


def test_unsupported_architecture(llama_dir, capsys):
    edit_config(llama_dir, architectures=["BertForMaskedLM"], model_type="bert")
    with pytest.raises(ConfigError, match="GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM"):
        load_reference(llama_dir)
    assert main(["generate", str(llama_dir), "hello"]) == 2
    assert "BertForMaskedLM is not supported" in capsys.readouterr().err


@pytest.mark.parametrize("changes, message", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "rope type 'llama3'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"head_dim": 16}, "head_dim 16"),
    ({"attention_bias": True}, "attention_bias=True with mlp_bias=False"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window"),
])
def test_unsupported_features(llama_dir, changes, message):
    edit_config(llama_dir, **changes)
    with pytest.raises(ConfigError, match=message):
        hf.load(llama_dir)


def test_missing_files(llama_dir, tmp_path):
    with pytest.raises(CheckpointError, match="Hugging Face folder not found"):
        hf.import_hf(tmp_path / "nope", tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="Hugging Face config.json not found"):
        hf.import_hf(tmp_path / "empty", tmp_path / "x")
    (llama_dir / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        hf.load(llama_dir)
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights: expected one of model.safetensors"):
        hf.read_hf_weights(llama_dir)


def test_sharded_safetensors(llama_dir):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(llama_dir / "model.safetensors"))
    want, _, _ = hf.load(llama_dir)
    (llama_dir / "model.safetensors").unlink()
    names = sorted(sd)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(llama_dir / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    index = llama_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    got, _, _ = hf.load(llama_dir)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)
    index.write_text(json.dumps({"weight_map": {**weight_map, "lm_head.weight": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside the folder"):
        hf.load(llama_dir)


def test_import_refuses_existing_out(llama_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="--overwrite"):
        hf.import_hf(llama_dir, tmp_path / "out")
    assert hf.import_hf(llama_dir, tmp_path / "out", overwrite=True) == tmp_path / "out"


UNSAFE_LOADED = []


def _record_unsafe_load():
    UNSAFE_LOADED.append(True)
    return {}


class Payload:
    def __reduce__(self):  # what a malicious pickle does: call an arbitrary function on load
        return (_record_unsafe_load, ())


def test_pytorch_model_bin_refuses_arbitrary_objects(llama_dir):
    from safetensors.torch import load_file

    sd = load_file(str(llama_dir / "model.safetensors"))
    (llama_dir / "model.safetensors").unlink()
    torch.save({**sd, "evil": Payload()}, llama_dir / "pytorch_model.bin")  # a real torch file, one bad object
    with pytest.raises(CheckpointError, match="weights_only=True"):
        hf.load(llama_dir)
    assert not UNSAFE_LOADED
    torch.save(sd, llama_dir / "pytorch_model.bin")  # plain tensors load
    model, _, _ = hf.load(llama_dir)
    assert model.cfg.n_kv_heads == 2


def test_mismatched_weights(llama_dir):
    edit_config(llama_dir, intermediate_size=64)
    with pytest.raises(CheckpointError, match="do not match config.json"):
        hf.load(llama_dir)
