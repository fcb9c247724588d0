"""The PyTorch eager side of the benchmark: transformers modules, sdpa attention, float32.

Each phase loads only the module it measures, straight from the checkpoint (see
``checkpoint.read_safetensors``), so a worker's peak RSS is that module's weights plus its
activations, as for the ORT side which loads only the parts it runs:

- vision: ``Qwen2(_5)VisionTransformerPretrainedModel`` (ViT + merger), called as transformers calls
  it: ``visual(pixel_values, grid_thw=...)``; it does its own rotary / window index math;
- LLM: ``Qwen2(_5)VLTextModel`` + the lm_head on the last position only (``logits_to_keep=1``, as
  our decoder graph). Image rows are scattered into the token embeddings inside the timed region,
  as ``Qwen2VLModel.forward`` does; the KV cache is transformers' ``DynamicCache``.
- Qwen3-VL: ``Qwen3VLVisionModel`` (ViT, merger and DeepStack mergers) and ``Qwen3VLTextModel``, which
  takes the DeepStack rows (``visual_pos_masks``, ``deepstack_visual_embeds``) in the prefill.

Only imported inside worker processes (torch and transformers are heavy).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from qvl_export.bench.checkpoint import read_safetensors
from qvl_export.core.spec import read_json

log = logging.getLogger(__name__)

ATTN = "sdpa"


def _classes(model_dir: Path):
    """(config class, vision class, text class, checkpoint prefixes of the vision and text weights)."""
    import transformers
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    arch = read_json(model_dir / "config.json", "the model config")["architectures"][0]
    if arch == "Qwen2VLForConditionalGeneration":
        return (transformers.Qwen2VLConfig, Qwen2VisionTransformerPretrainedModel, transformers.Qwen2VLTextModel,
                ("visual.", "model."))
    if arch == "Qwen3VLForConditionalGeneration":  # saved in transformers 5.x's module layout
        return (transformers.Qwen3VLConfig, transformers.Qwen3VLVisionModel, transformers.Qwen3VLTextModel,
                ("model.visual.", "model.language_model."))
    return (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VisionTransformerPretrainedModel,
            transformers.Qwen2_5_VLTextModel, ("visual.", "model."))


def _build(cls, config):
    """Module of ``cls`` with uninitialised parameters (they are all read from the checkpoint next)."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        module = cls._from_config(config, attn_implementation=ATTN, dtype=torch.float32)
    return module.eval()


def _check_filled(module, filled: set[str], what: str, allow_missing: tuple[str, ...] = ()) -> None:
    missing = [n for n, _ in module.named_parameters() if n not in filled and n not in allow_missing]
    if missing:
        raise RuntimeError(f"{what}: {len(missing)} parameters not in the checkpoint, e.g. {missing[:4]}")


def load_vision(model_dir: Path):
    """The vision tower (ViT + merger) of ``model_dir``, float32, sdpa."""
    config_cls, vision_cls, _, (prefix, _) = _classes(model_dir)
    config = config_cls.from_pretrained(model_dir)
    visual = _build(vision_cls, config.vision_config)
    _check_filled(visual, read_safetensors(visual, model_dir, prefix), "vision tower")
    return visual


class TorchLLM:
    """Text model + lm_head, with the prefill / decode steps the benchmark times."""

    def __init__(self, model_dir: Path):
        config_cls, _, text_cls, (_, prefix) = _classes(model_dir)
        config = config_cls.from_pretrained(model_dir)
        self.config = config
        self.text = _build(text_cls, config.text_config)
        self.image_token_id = int(config.image_token_id)
        tied = bool(getattr(config, "tie_word_embeddings", False)
                    or getattr(config.get_text_config(), "tie_word_embeddings", False))
        extra = {}
        if tied:
            self.lm_head = self.text.embed_tokens.weight  # [V, H], shared as transformers ties it
        else:
            t = config.text_config
            self.lm_head = torch.empty(t.vocab_size, t.hidden_size, dtype=torch.float32)
            extra["lm_head.weight"] = self.lm_head
        _check_filled(self.text, read_safetensors(self.text, model_dir, prefix, extra=extra), "text model")

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, image_embeds: torch.Tensor, position_ids: torch.Tensor,
                deepstack_embeds: torch.Tensor | None = None):
        """input_ids [1, T], image_embeds [N, H], position_ids [3, 1, T] (Qwen3-VL: deepstack_embeds
        [L, N, H]) -> (logits [1, V], cache)."""
        embeds = self.text.embed_tokens(input_ids)  # [1, T, H]
        image = input_ids == self.image_token_id
        embeds = embeds.masked_scatter(image[..., None].expand_as(embeds), image_embeds)
        extra = {} if deepstack_embeds is None else {"visual_pos_masks": image,
                                                     "deepstack_visual_embeds": list(deepstack_embeds)}
        out = self.text(inputs_embeds=embeds, position_ids=position_ids, use_cache=True, **extra)
        return out.last_hidden_state[:, -1] @ self.lm_head.t(), out.past_key_values

    @torch.inference_mode()
    def step(self, token: torch.Tensor, position_ids: torch.Tensor, cache):
        """token [1, 1], position_ids [3, 1, 1] -> logits [1, V]; ``cache`` grows by one."""
        out = self.text(inputs_embeds=self.text.embed_tokens(token), position_ids=position_ids,
                        past_key_values=cache, use_cache=True)
        return out.last_hidden_state[:, -1] @ self.lm_head.t()


def vision_runner(visual, patches: np.ndarray, grid: tuple[int, int, int]):
    """A zero-argument callable running the vision tower once on one prepared page."""
    pixel_values = torch.from_numpy(patches)
    grid_thw = torch.tensor([grid], dtype=torch.int64)

    def run():
        with torch.inference_mode():
            visual(pixel_values, grid_thw=grid_thw)

    return run
