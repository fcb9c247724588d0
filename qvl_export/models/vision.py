"""Export-ready vision encoder and merger for Qwen2-VL and Qwen2.5-VL.

The host (``runtimes/indexing.py``) does all data-dependent index math and feeds the graph:

- ``patches [S, patch_dim]`` in *graph order*: natural order for Qwen2-VL; for Qwen2.5-VL the
  window order of transformers' ``get_vision_window_index`` with every window padded at its end to
  ``L = window_tokens`` slots (64 for the real models), so ``S`` is a multiple of ``L``;
- ``rope_cos / rope_sin [S, head_dim]`` in the same order;
- ``image_ids [S] int64``: the image a slot belongs to, ``-1`` for a padding slot.

Full-attention blocks attend within an image (mask from ``image_ids``, built in the graph: no
S x S input). Window blocks (Qwen2.5-VL) reshape the sequence to ``[S / L, L]`` and attend within a
window with a key mask: O(S x L) work and memory, exact w.r.t. the unpadded reference because
padding keys get zero weight. ``window_attention="dense"`` is the baseline the peers use: the
same result through an S x S block-diagonal mask.

Qwen3-VL (``Qwen3VisionEncoder`` / ``Qwen3Merger``): natural order, every block full attention within
an image, and two more inputs for its learned position table, which transformers resamples to each
grid by bilinear interpolation (``get_vision_interpolation_indices_and_weights``, align_corners, in
merge-block order): the host computes the data-dependent part - for each patch the 4 table rows and
their weights - and the graph gathers the rows from the table it holds and sums them:

- ``pos_indices [S, 4] int64``, ``pos_weights [S, 4] float32`` -> ``+ sum_k table[idx_k] * w_k``.

DeepStack: the outputs of the blocks ``deepstack_visual_indexes`` leave the vision part as
``deepstack_hidden [L, S, C]``; the merger part runs each through its own merger (2x2 merge, then
LayerNorm over 4C) into ``deepstack_embeds [L, S/4, D]``, beside ``image_embeds [S/4, D]``.
"""

from __future__ import annotations

import torch
from torch import nn

from qvl_export.core.spec import VisionSpec
from qvl_export.models.common import RMSNorm, activation, apply_rotary, masked_softmax_attention

WINDOW_MODES = ("fused", "dense")


class VisionAttention(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.num_heads = spec.num_heads
        self.head_dim = spec.head_dim
        self.qkv = nn.Linear(spec.hidden_size, 3 * spec.hidden_size, bias=True)
        self.proj = nn.Linear(spec.hidden_size, spec.hidden_size, bias=True)
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor,
                window: int) -> torch.Tensor:
        # x [S, C]; cos/sin [S, 1, hd]
        seq = x.shape[0]
        qkv = self.qkv(x).reshape(seq, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [S, nh, hd]
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if window:  # [S/L, nh, L, hd]: attention inside each window
            q, k, v = (t.reshape(-1, window, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
            out = masked_softmax_attention(q, k, v, allowed, self.scale)  # [W, nh, L, hd]
            out = out.transpose(1, 2).reshape(seq, -1)
        else:  # [nh, S, hd]
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
            out = masked_softmax_attention(q, k, v, allowed, self.scale)  # [nh, S, hd]
            out = out.transpose(0, 1).reshape(seq, -1)
        return self.proj(out)


class VisionMLP(nn.Module):
    """Qwen2-VL: fc1 -> QuickGELU -> fc2. Qwen2.5-VL: SwiGLU with biases. Qwen3-VL: linear_fc1 ->
    tanh GELU -> linear_fc2 (the checkpoint's names)."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.gated = spec.family == "qwen2_5_vl"
        self.named = spec.family == "qwen3_vl"
        self.act = activation(spec.hidden_act)
        if self.gated:
            self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size)
            self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size)
            self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size)
        elif self.named:
            self.linear_fc1 = nn.Linear(spec.hidden_size, spec.intermediate_size)
            self.linear_fc2 = nn.Linear(spec.intermediate_size, spec.hidden_size)
        else:
            self.fc1 = nn.Linear(spec.hidden_size, spec.intermediate_size)
            self.fc2 = nn.Linear(spec.intermediate_size, spec.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        if self.named:
            return self.linear_fc2(self.act(self.linear_fc1(x)))
        return self.fc2(self.act(self.fc1(x)))


def _norm(spec: VisionSpec, dim: int) -> nn.Module:
    return RMSNorm(dim, 1e-6) if spec.family == "qwen2_5_vl" else nn.LayerNorm(dim, eps=1e-6)


class VisionBlock(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.norm1 = _norm(spec, spec.hidden_size)
        self.norm2 = _norm(spec, spec.hidden_size)
        self.attn = VisionAttention(spec)
        self.mlp = VisionMLP(spec)

    def forward(self, x, cos, sin, allowed, window: int):
        x = x + self.attn(self.norm1(x), cos, sin, allowed, window)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride is a matmul over flattened patches: patches [S, 1176] @ W^T
    (Qwen3-VL: [S, 1536], with the convolution's bias)."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.proj = nn.Linear(spec.patch_dim, spec.hidden_size, bias=spec.family == "qwen3_vl")

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches)


class VisionEncoder(nn.Module):
    """patches [S, patch_dim], rope_cos/rope_sin [S, hd], image_ids [S] -> vision_hidden [S, C]."""

    input_names = ("patches", "rope_cos", "rope_sin", "image_ids")
    output_names = ("vision_hidden",)
    weight_prefix = "visual."

    def __init__(self, spec: VisionSpec, window_attention: str = "fused"):
        super().__init__()
        if window_attention not in WINDOW_MODES:
            raise ValueError(f"window_attention must be one of {WINDOW_MODES}")
        self.spec = spec
        self.window_attention = window_attention
        self.patch_embed = PatchEmbed(spec)
        self.blocks = nn.ModuleList([VisionBlock(spec) for _ in range(spec.depth)])

    def forward(self, patches, rope_cos, rope_sin, image_ids):
        x = self.patch_embed(patches)
        cos, sin = rope_cos[:, None, :], rope_sin[:, None, :]  # [S, 1, hd]
        valid = image_ids >= 0
        # full attention: same image, key not padding. [S, S] bool, built in the graph
        full_allowed = (image_ids[:, None] == image_ids[None, :]) & valid[None, :]
        window = self.spec.window_tokens if self.spec.windowed else 0
        if window and self.window_attention == "fused":
            window_allowed = valid.reshape(-1, 1, 1, window)  # [W, 1, 1, L] key mask
        elif window:
            slot_window = torch.arange(x.shape[0], device=x.device) // window
            window_allowed = (slot_window[:, None] == slot_window[None, :]) & valid[None, :]
        for i, block in enumerate(self.blocks):
            if self.spec.is_full_attention(i):
                x = block(x, cos, sin, full_allowed, 0)
            elif self.window_attention == "fused":
                x = block(x, cos, sin, window_allowed, window)
            else:
                x = block(x, cos, sin, window_allowed, 0)
        return x

    def weight_aliases(self) -> dict[str, str]:
        # our PatchEmbed is a Linear over the Conv3d's flattened weight
        return {"patch_embed.proj.weight": "visual.patch_embed.proj.weight"}


class Merger(nn.Module):
    """vision_hidden [S, C] -> image_embeds [S/4, D]: norm, 2x2 units concatenated, MLP (GELU)."""

    input_names = ("vision_hidden",)
    output_names = ("image_embeds",)
    weight_prefix = "visual.merger."

    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.unit_dim = spec.hidden_size * spec.merge_unit
        self.ln_q = _norm(spec, spec.hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(self.unit_dim, self.unit_dim),
            nn.GELU(),
            nn.Linear(self.unit_dim, spec.out_hidden_size),
        )

    def forward(self, vision_hidden):
        return self.mlp(self.ln_q(vision_hidden).reshape(-1, self.unit_dim))

    def weight_aliases(self) -> dict[str, str]:
        return {}


class Qwen3VisionEncoder(VisionEncoder):
    """patches [S, 1536], rope_cos/rope_sin [S, hd], image_ids [S], pos_indices [S, 4], pos_weights [S, 4]
    -> vision_hidden [S, C], deepstack_hidden [L, S, C] (the outputs of the DeepStack blocks)."""

    def __init__(self, spec: VisionSpec):
        super().__init__(spec)
        self.pos_embed = nn.Embedding(spec.num_position_embeddings, spec.hidden_size)

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("patches", "rope_cos", "rope_sin", "image_ids", "pos_indices", "pos_weights")

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("vision_hidden", "deepstack_hidden") if self.spec.deepstack else ("vision_hidden",)

    def forward(self, patches, rope_cos, rope_sin, image_ids, pos_indices, pos_weights):
        x = self.patch_embed(patches)
        # the interpolated position table, as transformers sums it: rows in the table's dtype times float32
        # weights (so float32), summed over the 4 taps, then in x's dtype
        taps = self.pos_embed(pos_indices).float() * pos_weights[:, :, None]  # [S, 4, C]
        x = x + taps.sum(1).to(x.dtype)
        cos, sin = rope_cos[:, None, :], rope_sin[:, None, :]  # [S, 1, hd]
        valid = image_ids >= 0
        allowed = (image_ids[:, None] == image_ids[None, :]) & valid[None, :]  # [S, S], within each image
        features = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, allowed, 0)
            if i in self.spec.deepstack_visual_indexes:
                features.append(x)
        if not features:
            return x
        return x, torch.stack(features)  # in ViT layer order, as transformers collects them


class PatchMerger(nn.Module):
    """Qwen3-VL merger: [S, C] -> [S/4, D]. LayerNorm over C then the 2x2 merge (main merger), or the
    merge then LayerNorm over 4C (``postshuffle``: the DeepStack mergers); then fc1 -> GELU -> fc2."""

    def __init__(self, spec: VisionSpec, postshuffle: bool):
        super().__init__()
        self.unit_dim = spec.hidden_size * spec.merge_unit
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(self.unit_dim if postshuffle else spec.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.unit_dim, self.unit_dim)
        self.act = nn.GELU()
        self.linear_fc2 = nn.Linear(self.unit_dim, spec.out_hidden_size)

    def forward(self, x):
        if self.postshuffle:
            x = self.norm(x.reshape(-1, self.unit_dim))
        else:
            x = self.norm(x).reshape(-1, self.unit_dim)
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class Qwen3Merger(nn.Module):
    """vision_hidden [S, C], deepstack_hidden [L, S, C] -> image_embeds [S/4, D], deepstack_embeds [L, S/4, D]."""

    weight_prefix = "visual."

    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.spec = spec
        self.merger = PatchMerger(spec, postshuffle=False)
        self.deepstack_merger_list = nn.ModuleList([PatchMerger(spec, postshuffle=True)
                                                    for _ in range(spec.deepstack)])

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("vision_hidden", "deepstack_hidden") if self.spec.deepstack else ("vision_hidden",)

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("image_embeds", "deepstack_embeds") if self.spec.deepstack else ("image_embeds",)

    def forward(self, vision_hidden, deepstack_hidden=None):
        embeds = self.merger(vision_hidden)
        if not self.spec.deepstack:
            return embeds
        # deepstack_hidden is in ViT layer order; transformers picks each layer's merger by the layer's place
        # in deepstack_visual_indexes, and the decoder's layer j takes the j-th feature in layer order
        indexes = list(self.spec.deepstack_visual_indexes)
        mergers = [self.deepstack_merger_list[indexes.index(layer)] for layer in sorted(indexes)]
        return embeds, torch.stack([m(deepstack_hidden[j]) for j, m in enumerate(mergers)])

    def weight_aliases(self) -> dict[str, str]:
        return {}
