"""Export-ready Qwen2 decoder with M-RoPE, image-embedding insertion and a KV cache.

One graph serves prefill and decode:

- ``input_ids [B, T] int64``; ``image_embeds [N, H]`` (merger output for the prompt's images in
  order, ``N = 0`` in decode) are written into the rows whose id is the image token - in the graph,
  with an integer cumsum index, so the host does no scatter; image tokens past the N-th (a
  generated ``<|image_pad|>``) are embedded as text;
- ``position_ids [3, B, T] int64``: M-RoPE (t, h, w) positions from the host. The section
  interleave is folded *before* the float math: one integer select per frequency picks which of
  t/h/w drives it, so cos/sin are computed once per forward as ``[B, T, head_dim]`` and shared by
  every layer. In decode t = h = w, so this is plain 1-D RoPE;
- ``past_key_values.{i}.key/value [B, kv_heads, P, hd]`` -> ``present.{i}.key/value [B, kv_heads, P+T, hd]``;
- ``logits [B, 1, V]`` for the last position only (prefill never materialises [T, V]).

Attention is causal over past + new tokens; batches must not contain padding.

Qwen3-VL's text model differs in four places, each a field of ``TextSpec``: RMSNorm over each head of
q and k before the rotary (``qk_norm``), no attention biases, its sections interleaved over the
frequencies (t h w t h w ... then t: ``mrope_interleaved``, folded into the same integer select) and
DeepStack: ``deepstack_embeds [L, N, H]`` (the DeepStack mergers' rows for the prompt's images, in
the order of ``image_embeds``) are added to the hidden states of the image rows after each of the
first L layers, picked with the same integer index as the image rows themselves.
"""

from __future__ import annotations

import torch
from torch import nn

from qvl_export.core.spec import TextSpec
from qvl_export.models.common import RMSNorm, activation, apply_rotary, masked_softmax_attention


def mrope_component(spec: TextSpec) -> torch.Tensor:
    """[head_dim/2] int64: which position component (0=t, 1=h, 2=w) drives each frequency.

    Contiguous sections (Qwen2-VL, Qwen2.5-VL): t for the first mrope_section[0] frequencies, then h,
    then w. Interleaved (Qwen3-VL, transformers' ``Qwen3VLTextRotaryEmbedding.recomposition_frequencies``):
    frequency j takes h when j % 3 == 1 and j < 3 * mrope_section[1], w when j % 3 == 2 and
    j < 3 * mrope_section[2], t otherwise."""
    if spec.mrope_interleaved:
        j = torch.arange(spec.head_dim // 2)
        h = (j % 3 == 1) & (j < 3 * spec.mrope_section[1])
        w = (j % 3 == 2) & (j < 3 * spec.mrope_section[2])
        return torch.where(h, 1, torch.where(w, 2, 0)).to(torch.long)
    parts = [torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(spec.mrope_section)]
    return torch.cat(parts)


def inv_freq(spec: TextSpec) -> torch.Tensor:
    return 1.0 / (spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.int64).float() / spec.head_dim))


class DecoderAttention(nn.Module):
    def __init__(self, spec: TextSpec):
        super().__init__()
        self.nh, self.kvh, self.hd = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, self.nh * self.hd, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(spec.hidden_size, self.kvh * self.hd, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(spec.hidden_size, self.kvh * self.hd, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, spec.hidden_size, bias=spec.o_proj_bias)
        if spec.qk_norm:  # Qwen3: RMSNorm over each head's hd values, before the rotary
            self.q_norm = RMSNorm(self.hd, spec.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, spec.rms_norm_eps)
        self.qk_norm = spec.qk_norm
        self.scale = self.hd**-0.5

    def forward(self, x, cos, sin, allowed, past_k, past_v):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.nh, self.hd)  # [B, T, nh, hd]
        k = self.k_proj(x).reshape(b, t, self.kvh, self.hd)  # [B, T, kvh, hd]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, nh, T, hd], [B, kvh, T, hd]
        v = self.v_proj(x).reshape(b, t, self.kvh, self.hd).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        k = torch.cat([past_k, k], dim=2)  # [B, kvh, P+T, hd]
        v = torch.cat([past_v, v], dim=2)
        groups = self.nh // self.kvh
        # GQA: query heads grouped under their kv head -> [B, kvh, groups*T, hd]
        qg = q.reshape(b, self.kvh, groups * t, self.hd)
        out = masked_softmax_attention(qg, k, v, allowed, self.scale)  # [B, kvh, groups*T, hd]
        out = out.reshape(b, self.nh, t, self.hd).transpose(1, 2).reshape(b, t, self.nh * self.hd)
        return self.o_proj(out), k, v


class DecoderMLP(nn.Module):
    def __init__(self, spec: TextSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)
        self.act = activation(spec.hidden_act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: TextSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = DecoderAttention(spec)
        self.mlp = DecoderMLP(spec)

    def forward(self, x, cos, sin, allowed, past_k, past_v):
        h, k, v = self.self_attn(self.input_layernorm(x), cos, sin, allowed, past_k, past_v)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class LmHead(nn.Module):
    """logits = x @ W^T with W^T stored as [H, V]: a constant MatMul weight (quantizable per output
    channel). With tied embeddings the same [H, V] table also serves the token lookup (a Gather on
    axis 1), so the largest tensor of the model is stored once."""

    def __init__(self, spec: TextSpec):
        super().__init__()
        self.weight_t = nn.Parameter(torch.empty(spec.hidden_size, spec.vocab_size))

    def forward(self, x):
        return torch.matmul(x, self.weight_t)


class Decoder(nn.Module):
    """input_ids, image_embeds, (deepstack_embeds,) position_ids, past KV -> logits [B, 1, V], present KV."""

    weight_prefix = "model."

    def __init__(self, spec: TextSpec, image_token_id: int, deepstack: int = 0):
        super().__init__()
        self.spec = spec
        self.image_token_id = image_token_id
        self.deepstack = deepstack  # L: DeepStack features added after layers 0..L-1 (Qwen3-VL)
        self.embed_tokens = None if spec.tie_word_embeddings else nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(spec) for _ in range(spec.num_hidden_layers)])
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = LmHead(spec)
        self.register_buffer("inv_freq", inv_freq(spec), persistent=False)
        self.register_buffer("mrope_component", mrope_component(spec), persistent=False)

    @property
    def input_names(self) -> list[str]:
        names = ["input_ids", "image_embeds"] + (["deepstack_embeds"] if self.deepstack else []) + ["position_ids"]
        for i in range(self.spec.num_hidden_layers):
            names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        return names

    @property
    def output_names(self) -> list[str]:
        names = ["logits"]
        for i in range(self.spec.num_hidden_layers):
            names += [f"present.{i}.key", f"present.{i}.value"]
        return names

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [3, B, T] -> cos, sin [B, 1, T, hd] float32 (folded M-RoPE)."""
        # [B, T, hd/2]: for each frequency, the t/h/w position that section assigns to it
        pos = torch.gather(position_ids.permute(1, 2, 0), 2,
                           self.mrope_component.expand(*position_ids.shape[1:], -1))
        freqs = pos.float() * self.inv_freq  # [B, T, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, hd]
        return emb.cos(), emb.sin()

    def image_rows(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(is_image [B, T] bool, order [B, T] int64): the rows that take image_embeds, and for each row
        its row in the image table padded with a zero row in front (0: not an image row)."""
        pad = input_ids == self.image_token_id
        # row r of image_embeds goes to the r-th image token; row 0 of the padded table is unused
        order = torch.cumsum(pad.reshape(-1).to(torch.int64), 0).reshape(input_ids.shape)
        # A pad token beyond the rows given - every pad of a decode step (N = 0), where a sampled or
        # fine-tuned model emitted <|image_pad|> - is embedded as text, as transformers does; its
        # index is clamped to row 0 so the gather never leaves the table (on TensorRT an
        # out-of-range gather is silent garbage, not an error).
        is_image = pad & (order <= image_embeds.shape[0])
        return is_image, torch.where(is_image, order, torch.zeros_like(order))

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings with image rows replaced by image_embeds (in order)."""
        if self.embed_tokens is None:  # tied: rows of the [H, V] lm_head table
            flat = torch.index_select(self.lm_head.weight_t, 1, input_ids.reshape(-1))  # [H, B*T]
            text = flat.t().reshape(*input_ids.shape, self.spec.hidden_size)
        else:
            text = self.embed_tokens(input_ids)  # [B, T, H]
        is_image, order = self.image_rows(input_ids, image_embeds)
        table = torch.cat([image_embeds.new_zeros(1, self.spec.hidden_size), image_embeds], dim=0)
        picked = table[order]  # [B, T, H]
        return torch.where(is_image[..., None], picked, text)

    def forward(self, input_ids, image_embeds, position_ids, *past):
        return self.run(input_ids, image_embeds, None, position_ids, past)

    def run(self, input_ids, image_embeds, deepstack_embeds, position_ids, past):
        x = self.embed(input_ids, image_embeds)
        ds_rows = None
        if deepstack_embeds is not None:
            # [L, B, T, H]: each layer's DeepStack row for every image row, zeros elsewhere (row 0)
            _, order = self.image_rows(input_ids, image_embeds)
            ds_table = torch.cat([deepstack_embeds.new_zeros(self.deepstack, 1, self.spec.hidden_size),
                                  deepstack_embeds], dim=1)  # [L, N+1, H]
            ds_rows = ds_table[:, order]
        cos, sin = self.rotary(position_ids)
        t = input_ids.shape[1]
        past_len = past[0].shape[2]
        q_pos = torch.arange(t, device=x.device) + past_len
        k_pos = torch.arange(t + past_len, device=x.device)
        causal = k_pos[None, :] <= q_pos[:, None]  # [T, P+T]
        groups = self.spec.num_attention_heads // self.spec.num_key_value_heads
        allowed = causal.repeat(groups, 1)  # [groups*T, P+T], rows ordered (group, t)
        presents = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, allowed, past[2 * i], past[2 * i + 1])
            presents += [k, v]
            if ds_rows is not None and i < self.deepstack:  # transformers' _deepstack_process
                x = x + ds_rows[i].to(x.dtype)
        x = self.norm(x[:, -1:, :])
        logits = self.lm_head(x)  # [B, 1, V]
        return (logits, *presents)

    def weight_aliases(self) -> dict[str, str]:
        return {} if self.embed_tokens is None else {"embed_tokens.weight": "model.embed_tokens.weight"}

    def transposed_weights(self) -> dict[str, str]:
        source = "model.embed_tokens.weight" if self.spec.tie_word_embeddings else "lm_head.weight"
        return {"lm_head.weight_t": source}


class DeepStackDecoder(Decoder):
    """Qwen3-VL: ``deepstack_embeds [L, N, H]`` after ``image_embeds`` (see the module docstring)."""

    def forward(self, input_ids, image_embeds, deepstack_embeds, position_ids, *past):
        return self.run(input_ids, image_embeds, deepstack_embeds, position_ids, past)
