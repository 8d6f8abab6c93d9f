"""The transformer: shapes, KV cache == full forward for every option, causality, MoE routing, config checks."""

import itertools

import pytest
import torch

from toolkit.config import ModelConfig, model_config_from_dict
from toolkit.errors import ConfigError
from toolkit.model import Transformer

OPTIONS = [
    dict(pos_encoding=pe, norm_type=nt, norm_placement=npl, ffn_type=ff)
    for pe, nt, npl, ff in itertools.product(("learned", "sinusoidal", "rope"), ("layernorm", "rmsnorm"), ("pre", "post"), ("gelu", "relu", "swiglu"))
]
EXTRA = [dict(n_kv_heads=2), dict(n_kv_heads=1, pos_encoding="rope"), dict(n_experts=4, top_k=2),
         dict(n_experts=3, top_k=1, norm_placement="post", pos_encoding="learned"), dict(tie_embeddings=False, attn_bias=True, proj_bias=True)]


def small(**kw):
    base = dict(vocab_size=97, context_len=64, d_model=32, n_layers=2, n_heads=4)
    base.update(kw)
    return ModelConfig(**base)


def test_shapes():
    cfg = small(n_kv_heads=2)
    m = Transformer(cfg).eval()
    out = m(torch.randint(0, 97, (3, 10)), output_hidden_states=True)
    assert out.logits.shape == (3, 10, 97)
    assert len(out.present) == 2 and out.present[0][0].shape == (3, 2, 10, 8)
    assert len(out.hidden_states) == 3 and out.hidden_states[-1].shape == (3, 10, 32)


@pytest.mark.parametrize("opts", OPTIONS + EXTRA, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_incremental_decode_matches_full_forward(opts):
    torch.manual_seed(0)
    m = Transformer(small(**opts)).eval()
    ids = torch.randint(0, 97, (2, 14))
    with torch.no_grad():
        full = m(ids).logits
        out = m(ids[:, :6])
        steps = [out.logits]
        for t in range(6, 14):
            out = m(ids[:, t : t + 1], past_key_values=out.present)
            steps.append(out.logits)
    assert (full - torch.cat(steps, 1)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("opts", [dict(pos_encoding="learned"), dict(pos_encoding="rope", n_experts=4), dict(norm_placement="post")])
def test_causality(opts):
    torch.manual_seed(1)
    m = Transformer(small(**opts)).eval()
    a = torch.randint(0, 97, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 5) % 97  # change later tokens only
    with torch.no_grad():
        la, lb = m(a).logits, m(b).logits
    assert torch.equal(la[:, :8], lb[:, :8]) or (la[:, :8] - lb[:, :8]).abs().max() < 1e-6
    assert (la[:, 8:] - lb[:, 8:]).abs().max() > 1e-4


def test_padding_mask_matches_unpadded():
    """A left-padded row with attention_mask gives the unpadded row's logits."""
    torch.manual_seed(2)
    m = Transformer(small(pos_encoding="rope")).eval()
    ids = torch.randint(0, 97, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    pos = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
    with torch.no_grad():
        ref = m(ids).logits
        got = m(padded, position_ids=pos, attention_mask=mask).logits[:, 3:]
    assert (ref - got).abs().max() <= 1e-5


def test_moe_router_topk_and_noise_only_in_training():
    torch.manual_seed(3)
    m = Transformer(small(n_experts=4, top_k=2))
    moe = m.layers[0].mlp
    x = torch.randn(2, 5, 32)
    moe.eval()
    _, gates, _ = moe.gates(x)
    assert torch.allclose(gates.sum(-1), torch.ones(2, 5))
    assert ((gates > 0).sum(-1) == 2).all()
    assert torch.equal(moe.gates(x)[1], gates)  # no noise in eval: deterministic
    moe.train()
    assert not torch.equal(moe.gates(x)[0], moe.gates(x)[0])  # noisy in training
    m.train()
    out = m(torch.randint(0, 97, (2, 8)))
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    m.eval()
    assert m(torch.randint(0, 97, (2, 8))).aux_loss is None


def test_tied_embeddings_share_storage():
    m = Transformer(small(tie_embeddings=True))
    assert m.lm_head.weight.data_ptr() == m.embed_tokens.weight.data_ptr()
    u = Transformer(small(tie_embeddings=False))
    assert u.num_params() == m.num_params() + 97 * 32


@pytest.mark.parametrize("bad,message", [
    (dict(d_model=30, n_heads=4), "divisible by model.n_heads"),
    (dict(n_kv_heads=3), "must divide model.n_heads"),
    (dict(n_experts=1), "n_experts"),
    (dict(n_experts=2, top_k=3), "top_k"),
    (dict(pos_encoding="alibi"), "must be one of"),
    (dict(d_model="big"), "must be an integer"),
    (dict(colour=3), "unknown key model.colour"),
])
def test_config_errors(bad, message):
    base = dict(vocab_size=97, context_len=64, d_model=32, n_layers=2, n_heads=4)
    base.update(bad)
    with pytest.raises(ConfigError, match=message):
        model_config_from_dict(base)
