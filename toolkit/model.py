"""A compact decoder-only transformer, in one readable file (nanoGPT style).

Reference design: token embedding + positional encoding (learned | sinusoidal | rope) -> N blocks of
[multi-head causal self-attention with Q/K/V projections (optionally grouped-query), residual, norm
(pre | post, layernorm | rmsnorm), feed-forward (gelu | gelu_tanh | relu | swiglu) or a noisy top-k mixture of
experts] -> final norm -> output head (optionally tied) -> logits.

Parameter names follow the Hugging Face Llama layout (embed_tokens, layers.N.self_attn.q_proj,
mlp.up_proj, input_layernorm, norm, lm_head) so checkpoints map onto it without renaming tricks.

The KV cache is explicit: `forward` takes `past_key_values` (one (key, value) pair per layer, each
(B, n_kv_heads, P, head_dim)) and returns `present` pairs with P + T positions, so a prefill followed by
one-token steps gives the same logits as one full forward pass. The same signature is what ONNX export
traces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig  # noqa: F401  (re-exported: toolkit.model.ModelConfig)

# Finite masking constant: quantized NPU graphs and fp16 cannot hold -inf, and exp(-1e4) is exactly 0.
MASK_VALUE = -1e4


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, vocab)
    present: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, each (B, n_kv, P+T, hd)
    aux_loss: torch.Tensor | None = None  # mixture-of-experts load-balancing loss (training)
    hidden_states: list[torch.Tensor] = field(default_factory=list)  # embeddings, then each block's output


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm_type == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al. positional encoding for integer positions (B, T) -> (B, T, dim)."""
    half = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device)
    freqs = torch.exp(half * (-math.log(10000.0) / dim))  # (dim/2,)
    angles = positions.to(torch.float32).unsqueeze(-1) * freqs  # (B, T, dim/2)
    # interleave sin (even channels) and cos (odd channels)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[..., :dim]


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """Rotary embedding tables for positions (B, T) -> cos, sin of shape (B, 1, T, head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (B, T, hd/2)
    emb = torch.cat((angles, angles), dim=-1).unsqueeze(1)  # (B, 1, T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """Rotate-half convention (as Hugging Face Llama): x * cos + rotate_half(x) * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.kv_heads
        self.q_proj = nn.Linear(cfg.d_model, nh * hd, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(cfg.d_model, nkv * hd, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(cfg.d_model, nkv * hd, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(nh * hd, cfg.d_model, bias=cfg.proj_bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, rope, past, trace=None):
        B, T, _ = x.shape  # (B, T, C)
        hd, nh, nkv = self.cfg.head_dim, self.cfg.n_heads, self.cfg.kv_heads
        q = self.q_proj(x).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)  # (B, nkv, P+T, hd)
            v = torch.cat((past[1], v), dim=2)
        present = (k, v)
        if nkv != nh:  # grouped-query attention: each K/V head serves nh / nkv query heads
            k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, P+T, hd)
            v = v.repeat_interleave(nh // nkv, dim=1)
        if mask is None and trace is None:  # plain causal training/eval pass: fused kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.cfg.dropout if self.training else 0.0)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))  # (B, nh, T, P+T)
            if mask is None:
                mask = causal_mask(T, k.shape[2], None, x.device)
            scores = scores.masked_fill(~mask, MASK_VALUE)
            probs = torch.softmax(scores, dim=-1)
            if trace is not None:
                trace.update(q=q, k=k, v=v, attn=probs)
            y = self.dropout(probs) @ v  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)  # (B, T, C)
        return self.o_proj(y), present


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.ffn_type
        hidden, bias = cfg.ffn_hidden, cfg.proj_bias
        if self.kind == "swiglu":
            self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=bias)
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=bias)

    def forward(self, x):
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        elif self.kind == "relu":
            h = F.relu(self.up_proj(x))
        elif self.kind == "gelu_tanh":  # GPT-2's "gelu_new"
            h = F.gelu(self.up_proj(x), approximate="tanh")
        else:
            h = F.gelu(self.up_proj(x))
        return self.down_proj(h)


class MoEFeedForward(nn.Module):
    """Mixture of experts with a noisy top-k router (Shazeer et al., 2017).

    Router logits get learned-scale Gaussian noise in training only; the top-k logits per token are
    softmaxed (the others get weight 0) and the expert outputs are summed with those weights. Every
    expert is evaluated densely and weighted — simple, static-shaped and exportable; at this size the
    extra arithmetic is cheap. The Switch-style load-balancing loss is n_experts * sum_i f_i * P_i.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.noise = cfg.n_experts, cfg.top_k, cfg.router_noise
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.noise_proj = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(cfg) for _ in range(cfg.n_experts))

    def gates(self, x):
        logits = self.router(x)  # (B, T, E)
        if self.training and self.noise > 0:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise_proj(x)) * self.noise
        top_vals, top_idx = logits.topk(self.top_k, dim=-1)  # (B, T, k)
        gates = torch.zeros_like(logits).scatter(-1, top_idx, torch.softmax(top_vals, dim=-1))  # (B, T, E)
        return logits, gates, top_idx

    def forward(self, x):
        logits, gates, top_idx = self.gates(x)
        outs = torch.stack([e(x) for e in self.experts], dim=-2)  # (B, T, E, C)
        y = (gates.unsqueeze(-1) * outs).sum(dim=-2)  # (B, T, C)
        aux = None
        if self.training:
            frac = F.one_hot(top_idx, self.n_experts).float().sum(-2).mean(dim=(0, 1)) / self.top_k  # (E,)
            prob = torch.softmax(logits, dim=-1).mean(dim=(0, 1))  # (E,)
            aux = self.n_experts * (frac * prob).sum()
        return y, aux


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.post_norm = cfg.norm_placement == "post"
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MoEFeedForward(cfg) if cfg.n_experts else FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def _ffn(self, x):
        out = self.mlp(x)
        return out if isinstance(out, tuple) else (out, None)

    def forward(self, x, mask, rope, past, trace=None):
        if self.post_norm:  # reference order: attention -> add -> norm -> FFN -> add -> norm
            a, present = self.self_attn(x, mask, rope, past, trace)
            x = self.input_layernorm(x + self.dropout(a))
            f, aux = self._ffn(x)
            x = self.post_attention_layernorm(x + self.dropout(f))
        else:  # pre-norm: x + attn(norm(x)), x + ffn(norm(x))
            a, present = self.self_attn(self.input_layernorm(x), mask, rope, past, trace)
            x = x + self.dropout(a)
            f, aux = self._ffn(self.post_attention_layernorm(x))
            x = x + self.dropout(f)
        return x, present, aux


def causal_mask(T: int, S: int, attention_mask, device) -> torch.Tensor:
    """Boolean (B|1, 1, T, S) mask: query i (absolute position S-T+i) sees key j when j <= S-T+i and the
    key is not padding (attention_mask (B, S) with 1 = real token)."""
    q_pos = torch.arange(T, device=device).unsqueeze(1) + (S - T)  # (T, 1)
    k_pos = torch.arange(S, device=device).unsqueeze(0)  # (1, S)
    mask = (k_pos <= q_pos).view(1, 1, T, S)
    if attention_mask is not None:
        mask = mask & attention_mask.bool().view(attention_mask.shape[0], 1, 1, S)
    return mask


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos_encoding == "learned":
            self.embed_positions = nn.Embedding(cfg.context_len, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        # post-norm blocks already end in a norm; pre-norm needs a final one
        self.norm = make_norm(cfg) if cfg.norm_placement == "pre" else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 style scaled init of residual projections
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once

    def forward(self, input_ids, position_ids=None, attention_mask=None, past_key_values=None,
                output_hidden_states=False, trace=None) -> ModelOutput:
        """input_ids (B, T); position_ids (B, T) (default P..P+T-1); attention_mask (B, P+T), 1 = real
        token (default all ones); past_key_values: None or per-layer (key, value) of (B, nkv, P, hd).
        `trace`: a list that receives one dict per layer with q, k, v and attention probabilities."""
        B, T = input_ids.shape
        P = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if position_ids is None:
            position_ids = torch.arange(P, P + T, device=input_ids.device).unsqueeze(0).expand(B, T)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        rope = None
        if self.cfg.pos_encoding == "learned":
            x = x + self.embed_positions(position_ids)
        elif self.cfg.pos_encoding == "sinusoidal":
            x = x + sinusoidal(position_ids, self.cfg.d_model).to(x.dtype)
        else:
            rope = tuple(t.to(x.dtype) for t in rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta))
        x = self.dropout(x)
        mask = None
        if attention_mask is not None or past_key_values is not None:
            mask = causal_mask(T, P + T, attention_mask, input_ids.device)
        hidden = [x] if output_hidden_states else []
        present, aux_total = [], None
        for i, layer in enumerate(self.layers):
            layer_trace = {} if trace is not None else None
            x, kv, aux = layer(x, mask, rope, None if past_key_values is None else past_key_values[i], layer_trace)
            present.append(kv)
            if trace is not None:
                trace.append(layer_trace)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
            if output_hidden_states:
                hidden.append(x)
        logits = self.lm_head(self.norm(x))  # (B, T, vocab)
        if aux_total is not None:
            aux_total = aux_total * (self.cfg.aux_loss_coef / self.cfg.n_layers)
        return ModelOutput(logits=logits, present=present, aux_loss=aux_total, hidden_states=hidden)

    def loss(self, input_ids, targets):
        """Next-token cross-entropy (+ the MoE load-balancing loss when training)."""
        out = self(input_ids)
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
        total = ce if out.aux_loss is None else ce + out.aux_loss
        return total, ce

    def generate(self, input_ids, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, eos_id=None, rng=None):
        """Autoregressive generation with the KV cache; yields new token ids as they are produced.
        input_ids (1, T); rng: a numpy Generator for seeded sampling. Stops at eos (not yielded), after
        max_new_tokens, or when the context window is full."""
        from .runtime.sampling import sample_next  # the same sampler the on-device runtime uses

        self.eval()
        with torch.no_grad():
            out = self(input_ids)
            for n in range(max_new_tokens):
                nxt = sample_next(out.logits[0, -1].float().numpy(), temperature, top_k, top_p, rng)
                if nxt == eos_id:
                    return
                yield nxt
                if input_ids.shape[1] + n + 1 >= self.cfg.context_len:
                    return
                out = self(torch.tensor([[nxt]]), past_key_values=out.present)
