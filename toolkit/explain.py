"""`edgekit explain`: walk one prompt through the model the way the reference design narrates it.

Everything printed is read from the real model's tensors via `trace`, the per-layer record that the
parity harness also uses (hidden states per block) to find where two backends first diverge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import Transformer
from .tokenizer import encode


@dataclass
class Trace:
    ids: list[int]
    tokens: list[str]
    embedding_shape: tuple
    positional: str
    layers: list[dict]  # per layer: q/k/v shapes, attention of the last token, block output
    hidden_states: list[torch.Tensor]  # embeddings, then each block's output, each (1, T, C)
    logits: torch.Tensor  # (1, T, vocab)


@torch.no_grad()
def trace(model: Transformer, tok, prompt: str) -> Trace:
    ids = encode(tok, prompt)
    if not ids:
        raise ValueError("empty prompt")
    x = torch.tensor([ids])
    per_layer: list[dict] = []
    out = model(x, output_hidden_states=True, trace=per_layer)
    return Trace(
        ids=ids,
        tokens=[tok.id_to_token(i) for i in ids],
        embedding_shape=tuple(model.embed_tokens(x).shape),
        positional=model.cfg.pos_encoding,
        layers=per_layer,
        hidden_states=out.hidden_states,
        logits=out.logits,
    )


def render(model: Transformer, tok, prompt: str) -> str:
    t = trace(model, tok, prompt)
    cfg = model.cfg
    lines = [f"prompt: {prompt!r}", f"1. tokens ({len(t.ids)}): " + " ".join(f"{s!r}={i}" for s, i in zip(t.tokens, t.ids))]
    lines.append(f"2. token embedding: ids (1, {len(t.ids)}) -> {t.embedding_shape} (vocab {cfg.vocab_size} x d_model {cfg.d_model})")
    pos = {"learned": "learned position embedding added", "sinusoidal": "sinusoidal encoding added",
           "rope": f"rotary embedding applied to Q and K (theta {cfg.rope_theta:g})"}[t.positional]
    lines.append(f"3. positional encoding: {pos}; block input {tuple(t.hidden_states[0].shape)}")
    for i, layer in enumerate(t.layers):
        attn = layer["attn"][0, :, -1, :]  # (heads, T): what the last token attends to
        mean = attn.mean(0)
        top = torch.topk(mean, min(3, mean.numel()))
        focus = ", ".join(f"{t.tokens[j]!r} {p:.2f}" for p, j in zip(top.values.tolist(), top.indices.tolist()))
        lines.append(
            f"4.{i} layer {i}: Q {tuple(layer['q'].shape)} K {tuple(layer['k'].shape)} V {tuple(layer['v'].shape)}"
            f" scaled by 1/sqrt({cfg.head_dim}); last token attends most to: {focus};"
            f" output {tuple(t.hidden_states[i + 1].shape)} (norm {cfg.norm_placement}-{cfg.norm_type}, ffn "
            f"{cfg.ffn_type}{f', {cfg.n_experts} experts top-{cfg.top_k}' if cfg.n_experts else ''})"
        )
        per_head = " | ".join(" ".join(f"{p:.2f}" for p in row.tolist()) for row in attn)
        lines.append(f"     attention probabilities per head (last token over {len(t.ids)} positions): {per_head}")
    probs = torch.softmax(t.logits[0, -1].float(), dim=-1)
    top = torch.topk(probs, 5)
    lines.append(f"5. logits {tuple(t.logits.shape)} -> softmax; top-5 next tokens:")
    for p, j in zip(top.values.tolist(), top.indices.tolist()):
        lines.append(f"     {tok.id_to_token(j)!r} (id {j}, decodes to {tok.decode([j])!r}): {p:.4f}")
    return "\n".join(lines)
