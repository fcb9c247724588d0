"""Train our tiny document readers: the built-in demo checkpoint (invoices), the form reader or the chart reader.

    python tools/train_demo.py --out DIR [--task invoice|form|chart] [--minutes 18] [--threads 2] [--samples DIR]

Random weights cannot tell whether a quantized build still reads documents; these models can.

- ``--task invoice`` (default): the demo checkpoint, a ``Qwen2_5_VLForConditionalGeneration``
  (windowed + full-attention ViT, merger, Qwen2 decoder with M-RoPE, untied embeddings, the
  Qwen2-VL chat template with its default system turn) that reads the total off rendered invoices
  (``qvl_export.demo.documents``).
- ``--task form``: the form reader (``tests/data/trained/form_reader``), a
  ``Qwen2VLForConditionalGeneration`` (full-attention ViT, 4 decoder layers, head dim 48, tied
  embeddings, a chat template without a default system turn) that reads the account number or the
  amount off a rendered form, whichever the question asks (``qvl_export.demo.forms``).
- ``--task chart``: the chart reader (``tests/data/trained/chart_reader``), a
  ``Qwen2_5_VLForConditionalGeneration`` again but with 168 px attention windows, 3 decoder layers
  of head dim 80 (2 heads, one KV head), untied embeddings, another tokenizer and a chat template
  with its own system turn, that reads the value of the bar the question names off a rendered bar
  chart (``qvl_export.demo.charts``).

All are trained on CPU in two phases, as FIELD_NOTES.md ("Training a tiny demo checkpoint on CPU")
found necessary - end-to-end training from scratch stalls at chance because the decoder learns
the answer prior long before the ViT gets a useful gradient:

1. **Vision tower + merger** with direct, dense heads on the merger outputs (one row per image
   token): for every token, which digit of which numeric field it holds (field, slot 0-3 and
   value 0-9; the invoice has one field, the total, the form two, the chart one per category of
   ``CHART_CATEGORIES``, empty for the categories a chart does not show), and the value of the digit
   centred in each of its 2x2 patches. The heads are thrown away afterwards. (A head on pooled
   features alone stayed near chance for 150+ steps.)
2. **Decoder, then the whole model**, with the language-model loss on the answer tokens of the
   chat-formatted prompt, built as ``Qwen2VLProcessor`` builds it (chat template,
   ``<|image_pad|>`` expanded to ``t*h*w/4`` copies, ``mm_token_type_ids`` so transformers applies
   M-RoPE to image tokens). 2a keeps the ViT frozen and runs it once over a pool of pages, so
   decoder steps are cheap; one attention head of the last decoder layer is also told which image
   token holds the next digit of the asked field (routing loss: without it the decoder was at 44% token accuracy
   after 300 steps). 2b fine-tunes everything on fresh pages, the ViT at a lower rate.

Step counts are fixed (the run is deterministic for a given thread count); ``--minutes`` is a
guard that cuts a phase short when the machine is slower than planned (recorded in eval.json).
Afterwards the checkpoint is saved with ``save_pretrained`` (fp32 safetensors) beside the
tokenizer, chat template, generation and preprocessor configs, and ``eval.json`` reports
exact-match accuracy of transformers' greedy ``generate`` on held-out pages (the parity reference
``TorchReference`` builds the inputs, so the evaluation sees exactly what parity runs see).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from qvl_export.demo import TASKS, Task, charts, forms
from qvl_export.demo.documents import MAX_ANSWER_DIGITS, PAGE_SIZE, question, render_invoice
from qvl_export.documents.render import (CHART_CATEGORIES, CHART_SIZE, FORM_FIELDS, FORM_SIZE, render_chart,
                                         render_form)
from qvl_export.loading.synthetic import (CHAT_TEMPLATE, QWEN3_CHAT_TEMPLATE, CheckpointDims, build_model_config,
                                          train_tokenizer, write_processing_files)

log = logging.getLogger("train_demo")

# Architecture of the demo model: ~1.5 M parameters, ~6 MB of fp32 safetensors.
DEMO_TRAINED_DIMS = CheckpointDims(
    family="qwen2_5_vl", vision_depth=4, vision_hidden=96, vision_heads=3, vision_intermediate=256,
    fullatt_block_indexes=(1, 3), window_size=112, text_hidden=128, text_layers=3, text_heads=4,
    text_kv_heads=2, text_intermediate=384, mrope_section=(4, 6, 6), tie_word_embeddings=False,
    tokenizer_vocab=640, max_position_embeddings=4096, init_std=0.02, seed=2024,
)
# The form reader: a Qwen2-VL (full-attention ViT), deeper and wider decoder with head dim 48
# (mrope 8+8+8), one KV head, tied embeddings, another tokenizer and a template without a system
# turn; ~1.7 M parameters.
FORM_TRAINED_DIMS = CheckpointDims(
    family="qwen2_vl", vision_depth=4, vision_hidden=96, vision_heads=3, vision_intermediate=288,
    text_hidden=144, text_layers=4, text_heads=3, text_kv_heads=1, text_intermediate=384,
    mrope_section=(8, 8, 8), tie_word_embeddings=True, tokenizer_vocab=768, max_position_embeddings=4096,
    init_std=0.02, seed=2025, chat_template=QWEN3_CHAT_TEMPLATE,
)
# The chart reader's template: the Qwen2-VL one with its own default system turn (a third variant:
# the demo has Qwen2-VL's "You are a helpful assistant.", the form reader no system turn at all).
CHART_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("You are a helpful assistant.", "You read charts and answer with a number.")
# The chart reader: a Qwen2.5-VL again, with 168 px attention windows (6x6 image tokens: the 11x8-token
# chart page is 2x2 windows, padded) and full attention in blocks 1 and 3 (a name and its bar's data
# label sit up to 10 tokens apart); a decoder of head dim 80 (2 heads, mrope 8+16+16), one KV head,
# untied embeddings, a 704-entry tokenizer and its own system turn; ~1.8 M parameters.
CHART_TRAINED_DIMS = CheckpointDims(
    family="qwen2_5_vl", vision_depth=4, vision_hidden=96, vision_heads=3, vision_intermediate=256,
    fullatt_block_indexes=(1, 3), window_size=168, text_hidden=160, text_layers=3, text_heads=2,
    text_kv_heads=1, text_intermediate=384, mrope_section=(8, 16, 16), tie_word_embeddings=False,
    tokenizer_vocab=704, max_position_embeddings=4096, init_std=0.02, seed=2026, chat_template=CHART_CHAT_TEMPLATE,
)
DIGIT_SLOTS = MAX_ANSWER_DIGITS
ROUTE_HEAD = 0  # decoder head (last layer) trained to attend to the image token of the next digit
NONE_CLASS = 10  # "no digit here" for the slots past the last digit of a 3-digit total
VAL_SEED_OFFSET = 20_000_000  # validation pages for the curves (held-out eval uses documents.HELDOUT_SEED_OFFSET)


@dataclass
class Schedule:
    """Step counts and rates of the run (fixed, so the run is reproducible)."""

    batch: int = 32
    phase1_steps: int = 160  # the dense heads reach ~99% by ~140 steps
    phase1_lr: float = 3e-3
    route_pages: int = 2400  # pages the frozen ViT encodes once for phase 2a
    route_steps: int = 600
    route_weight: float = 1.0
    phase2_lr: float = 2e-3
    joint_steps: int = 30
    joint_lr: float = 3e-4
    joint_vision_lr: float = 1e-4
    warmup: int = 30
    eval_every: int = 40
    val_size: int = 128
    heldout: int = 250


@dataclass
class Example:
    """One training page: the question and its answer, and every numeric field on the page (digits,
    pixel centres of the digits) with the index of the asked one."""

    image: Any
    prompt: str
    answer: str
    fields: list[str]
    centres: list[list[tuple[float, float]]]
    asked: int


def invoice_example(seed: int) -> Example:
    page = render_invoice(seed)
    answer = str(page.total)
    return Example(page.image, question(seed), answer, [answer], [page.total_digits], 0)


def form_example(seed: int) -> Example:
    page = render_form(seed)
    field = forms.asked_field(seed)
    return Example(page.image, forms.question(seed), page.fields[field], [page.fields[f] for f in FORM_FIELDS],
                   [page.digits[f] for f in FORM_FIELDS], FORM_FIELDS.index(field))


def chart_example(seed: int) -> Example:
    """One field per category of ``CHART_CATEGORIES`` (empty for those the chart does not show), so
    phase 1 tells the ViT which category each data label belongs to."""
    page = render_chart(seed)
    name = charts.asked_category(seed, page)
    return Example(page.image, charts.question(seed, page), page.values[name],
                   [page.values.get(c, "") for c in CHART_CATEGORIES],
                   [page.digits.get(c, []) for c in CHART_CATEGORIES], CHART_CATEGORIES.index(name))


@dataclass(frozen=True)
class TrainTask:
    """What the script trains for one task: the registry's task, the architecture, the page size,
    the numeric fields per page, the example maker and the default schedule."""

    task: Task
    dims: CheckpointDims
    page_size: tuple[int, int]
    fields: int
    example: Any
    schedule: Schedule
    sample_name: str


TRAIN_TASKS = {
    "invoice": TrainTask(TASKS["invoice"], DEMO_TRAINED_DIMS, PAGE_SIZE, 1, invoice_example, Schedule(), "invoice"),
    # Two fields to tell apart by the question: more routing steps on more pages.
    "form": TrainTask(TASKS["form"], FORM_TRAINED_DIMS, FORM_SIZE, 2, form_example,
                      Schedule(phase1_steps=300, route_pages=4800, route_steps=1500, joint_steps=100), "form"),
    # The asked bar is found by its category's name: the form's schedule, more ViT steps to read names.
    "chart": TrainTask(TASKS["chart"], CHART_TRAINED_DIMS, CHART_SIZE, len(CHART_CATEGORIES), chart_example,
                       Schedule(phase1_steps=340, route_pages=4800, route_steps=1500, joint_steps=100), "chart"),
}


# ---------------------------------------------------------------------------------------------- data

class Batcher:
    """Renders pages for training seeds and turns them into model inputs (patches, prompt ids)."""

    def __init__(self, tok_fast: Any, spec: Any, task: TrainTask = TRAIN_TASKS["invoice"]):
        import torch

        self.torch = torch
        self.task = task
        self.spec = spec
        self.tok = tok_fast
        self.image_token_id = spec.tokens.image_token_id
        self.pad_id = tok_fast.convert_tokens_to_ids("<|endoftext|>")
        self.end_id = tok_fast.convert_tokens_to_ids("<|im_end|>")
        self._prompt_ids: dict[tuple[str, int], list[int]] = {}

    def pixels(self, images: list) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Pages -> (pixel_values [B*S, 1176] float32, image_grid_thw [B, 3] int64), as the processor."""
        from qvl_export.runtimes.preprocess import preprocess_image

        patches, grids = zip(*(preprocess_image(im, self.spec.vision, self.spec.preprocess) for im in images))
        torch = self.torch
        return (torch.from_numpy(np.concatenate(patches, axis=0)),
                torch.tensor(grids, dtype=torch.long))

    def prompt_ids(self, prompt: str, image_tokens: int) -> list[int]:
        """Chat template -> ``<|image_pad|>`` x image_tokens -> token ids (as Qwen2VLProcessor)."""
        key = (prompt, image_tokens)
        if key not in self._prompt_ids:
            content = [{"type": "image"}, {"type": "text", "text": prompt}]
            text = self.tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True)
            text = text.replace("<|image_pad|>", "<|image_pad|>" * image_tokens)
            self._prompt_ids[key] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._prompt_ids[key]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tok(answer, add_special_tokens=False)["input_ids"] + [self.end_id]

    def examples(self, seeds: list[int]) -> dict[str, Any]:
        """Model inputs and training targets for the pages of ``seeds`` (batch B = len(seeds))."""
        torch = self.torch
        pages = [self.task.example(s) for s in seeds]
        answers = [p.answer for p in pages]
        pixel_values, grid_thw = self.pixels([p.image for p in pages])
        merge = self.spec.vision.merge_unit
        unit = self.spec.vision.patch_size * self.spec.vision.spatial_merge_size  # 28 px per image token
        cols, rows = self.task.page_size[0] // unit, self.task.page_size[1] // unit
        n, slots = len(pages), self.task.fields * DIGIT_SLOTS
        assert grid_thw.tolist() == [[1, 2 * rows, 2 * cols]] * n, "pages must not be resized"
        digits = torch.full((n, slots), NONE_CLASS, dtype=torch.long)  # [B, fields*slots]
        # Where the fields' digits are: [B, rows*cols, fields*slots] = digit k of field f's value in
        # the image token whose 28x28 cell holds its centre (column f*DIGIT_SLOTS + k), NONE_CLASS
        # everywhere else.
        where = torch.full((n, rows * cols, slots), NONE_CLASS, dtype=torch.long)
        # The same digits per 14x14 patch: [B, rows*cols, 4] = the value of the digit whose centre
        # is in patch (i, j) of the token's 2x2, NONE_CLASS elsewhere (no field or slot to infer).
        chars = torch.full((n, rows * cols, merge), NONE_CLASS, dtype=torch.long)
        half = unit // 2
        seqs, labels, route = [], [], []
        for i, page in enumerate(pages):
            for f, (value, centres) in enumerate(zip(page.fields, page.centres)):
                base = f * DIGIT_SLOTS
                digits[i, base:base + len(value)] = torch.tensor([int(c) for c in value])
                for k, (x, y) in enumerate(centres):
                    where[i, min(int(y) // unit, rows - 1) * cols + min(int(x) // unit, cols - 1), base + k] = \
                        int(value[k])
                    r, c = min(int(y) // half, 2 * rows - 1), min(int(x) // half, 2 * cols - 1)
                    chars[i, (r // 2) * cols + c // 2, (r % 2) * 2 + c % 2] = int(value[k])
            ids = self.prompt_ids(page.prompt, rows * cols)
            ans = self.answer_ids(page.answer)
            first_image = ids.index(self.image_token_id)
            for k in range(len(page.answer)):  # (page, position predicting answer digit k, image token holding it)
                cell = int((where[i, :, page.asked * DIGIT_SLOTS + k] != NONE_CLASS).nonzero()[0])
                route.append((i, len(ids) + k - 1, first_image + cell))
            seqs.append(ids + ans)
            labels.append([-100] * len(ids) + ans)
        width = max(len(s) for s in seqs)  # right padding: training only, positions follow attention_mask
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        target = torch.full((n, width), -100, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, (s, lab) in enumerate(zip(seqs, labels)):
            input_ids[i, :len(s)] = torch.tensor(s)
            target[i, :len(s)] = torch.tensor(lab)
            mask[i, :len(s)] = 1
        mm = (input_ids == self.image_token_id).long()  # mm_token_type_ids: 0 text, 1 image
        return dict(pixel_values=pixel_values, image_grid_thw=grid_thw, digits=digits, where=where, chars=chars,
                    input_ids=input_ids, attention_mask=mask, mm_token_type_ids=mm, labels=target,
                    route=torch.tensor(route, dtype=torch.long), answers=list(answers))


# ---------------------------------------------------------------------------------------------- model

def linear_patch_embed(visual) -> None:
    """Run the ViT's Conv3d patch embedding as the equal matmul (the conv was a quarter of a phase-1
    step on CPU; same weights, equal up to float rounding: 3e-6 on outputs of ~2).

    The conv's kernel covers the whole (C, T, p, p) patch with stride = kernel, so it is a Linear
    over the flattened patch row; the parameter stays the conv weight that save_pretrained writes.
    """
    import types

    embed = visual.patch_embed

    def forward(self, hidden_states):  # [S, C*T*p*p] -> [S, hidden]
        weight = self.proj.weight.reshape(self.embed_dim, -1)
        return hidden_states.to(weight.dtype) @ weight.t()

    embed.forward = types.MethodType(forward, embed)


def lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


# ---------------------------------------------------------------------------------------------- phases

def merger_tokens(model, batch: dict[str, Any]):
    """Merger outputs per page: [B, N, D] (every training page has the same grid)."""
    out = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
    return out.reshape(batch["digits"].shape[0], -1, out.shape[-1])


def run_phase1(model, batcher: Batcher, sched: Schedule, val: dict[str, Any], deadline: float,
               curve: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    width = model.config.text_config.hidden_size  # the merger's output
    slots = batcher.task.fields * DIGIT_SLOTS
    locate = torch.nn.Linear(width, slots * (NONE_CLASS + 1))  # per token: which digit of which field
    glyphs = torch.nn.Linear(width, 4 * (NONE_CLASS + 1))  # per token: the digit in each of its 2x2 patches
    params = [p for m in (model.model.visual, locate, glyphs) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=sched.phase1_lr, weight_decay=0.01, betas=(0.9, 0.98))
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    done = 0
    running = []
    for step in range(sched.phase1_steps):
        if time.monotonic() > deadline:
            log.warning("phase 1: time budget reached after %d of %d steps", step, sched.phase1_steps)
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, sched.phase1_steps, sched.phase1_lr, sched.warmup)
        seeds = list(range(step * sched.batch, (step + 1) * sched.batch))
        batch = batcher.examples(seeds)
        tokens = merger_tokens(model, batch)  # [B, N, D]
        loss = 0.0
        for dense_head, key in ((locate, "where"), (glyphs, "chars")):
            dense = dense_head(tokens).reshape(-1, NONE_CLASS + 1)  # [B*N*4, 11]
            target = batch[key].reshape(-1)
            here = target != NONE_CLASS  # digits and the (many more) empty places weigh the same
            loss = loss + loss_fn(dense[here], target[here]) + loss_fn(dense[~here], target[~here])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running.append(loss.item())
        done = step + 1
        if done % sched.eval_every == 0 or done == sched.phase1_steps:
            metrics = phase1_metrics(model, locate, glyphs, val)
            curve.append({"phase": 1, "step": done, "loss": float(np.mean(running)), **metrics})
            running = []
            log.info("phase 1 step %d: %s", done, curve[-1])
    metrics = phase1_metrics(model, locate, glyphs, val)
    return {"steps": done, **metrics}


def phase1_metrics(model, locate, glyphs, val: dict[str, Any]) -> dict[str, float]:
    """Digit accuracy of the dense heads where the total's digits are (``located``: value and slot,
    ``glyph``: value per patch) - the phase-1 target - and, for reference, the total read off the
    located head alone by taking per slot the token most likely to hold that digit (``digit_acc``
    per slot, ``number_acc`` all slots). The latter stays low: the loss weighs the few digit tokens
    and the many empty ones equally, which leaves false positives elsewhere on the page; finding
    the right token is the decoder's job (phase 2, routing loss)."""
    import torch

    model.eval()
    preds, right, count = [], {"where": 0, "chars": 0}, {"where": 0, "chars": 0}
    with torch.no_grad():
        for b in val["chunks"]:
            tokens = merger_tokens(model, b)
            for dense_head, key in ((locate, "where"), (glyphs, "chars")):
                target = b[key]
                dense = dense_head(tokens).reshape(*target.shape, NONE_CLASS + 1)  # [B, N, 4, 11]
                here = target != NONE_CLASS
                right[key] += int((dense.argmax(-1)[here] == target[here]).sum())
                count[key] += int(here.sum())
                if key == "where":
                    prob = dense.softmax(-1)  # [B, N, slots, 11]
                    cell = (1 - prob[..., NONE_CLASS]).argmax(1)  # [B, slots] most likely token per slot
                    at = prob.gather(1, cell[:, None, :, None].expand(-1, 1, -1, NONE_CLASS + 1))[:, 0]
                    preds.append(at.argmax(-1))  # [B, slots] value there (NONE_CLASS if no digit)
    model.train()
    pred, digits = torch.cat(preds), val["digits"]
    return {"digit_acc": float((pred == digits).float().mean()),
            "number_acc": float((pred == digits).all(-1).float().mean()),
            "located_digit_acc": right["where"] / max(1, count["where"]),
            "glyph_acc": right["chars"] / max(1, count["chars"])}


def encode_pages(model, batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the (frozen) vision tower once: each batch keeps its merger output ``image_embeds``
    [B*N, D] instead of its pixels, so decoder steps on it skip the ViT."""
    import torch

    out = []
    with torch.no_grad():
        for b in batches:
            b = dict(b)
            b["image_embeds"] = model.model.visual(b.pop("pixel_values"), grid_thw=b["image_grid_thw"]).pooler_output
            out.append(b)
    return out


def run_phase2(model, batcher: Batcher, sched: Schedule, val: dict[str, Any], deadline: float,
               curve: list[dict[str, Any]], seed_base: int) -> dict[str, Any]:
    """2a: the decoder learns to route image tokens to the answer on a pool of pages encoded once by
    the frozen ViT (cheap steps). 2b: the whole model on fresh pages, the ViT at a lower rate."""
    import torch

    visual = list(model.model.visual.parameters())
    vis_ids = {id(p) for p in visual}
    rest = [p for p in model.parameters() if id(p) not in vis_ids]
    model.train()
    done, running = 0, []
    total = sched.route_steps + sched.joint_steps

    def log_point(step: int, val_batches: list[dict[str, Any]]) -> None:
        nonlocal running
        curve.append({"phase": 2, "step": step, "loss": float(np.mean(running)), **phase2_metrics(model, val_batches)})
        running = []
        log.info("phase 2 step %d: %s", step, curve[-1])

    model.set_attn_implementation({"text_config": "eager"})  # attention probabilities for the routing loss
    # 2a: frozen ViT, decoder only, on cached merger outputs.
    model.model.visual.requires_grad_(False)
    n_chunks = max(1, sched.route_pages // sched.batch)
    pool = encode_pages(model, [batcher.examples(list(range(seed_base + i * sched.batch,
                                                               seed_base + (i + 1) * sched.batch)))
                                for i in range(n_chunks)])
    val_cached = encode_pages(model, val["chunks"])
    log.info("phase 2: %d pages encoded for routing", n_chunks * sched.batch)
    opt = torch.optim.AdamW(rest, lr=sched.phase2_lr, weight_decay=0.01, betas=(0.9, 0.98))
    order = random.Random(seed_base)
    for step in range(sched.route_steps):
        if time.monotonic() > deadline:
            log.warning("phase 2a: time budget reached after %d of %d steps", step, sched.route_steps)
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, sched.route_steps, sched.phase2_lr, sched.warmup)
        loss = lm_loss(model, pool[order.randrange(len(pool))], sched.route_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rest, 1.0)
        opt.step()
        running.append(loss.item())
        done = step + 1
        if done % sched.eval_every == 0 or done == sched.route_steps:
            log_point(done, val_cached)
    del pool
    model.model.visual.requires_grad_(True)

    # 2b: the whole model on fresh pages.
    opt = torch.optim.AdamW([{"params": rest}, {"params": visual}], lr=sched.joint_lr, weight_decay=0.01,
                            betas=(0.9, 0.98))
    seed_base += n_chunks * sched.batch
    for step in range(sched.joint_steps):
        if time.monotonic() > deadline:
            log.warning("phase 2b: time budget reached after %d of %d steps", step, sched.joint_steps)
            break
        text_group, vision_group = opt.param_groups
        text_group["lr"] = lr_at(step, sched.joint_steps, sched.joint_lr, 0)
        vision_group["lr"] = lr_at(step, sched.joint_steps, sched.joint_vision_lr, 0)
        seeds = list(range(seed_base + step * sched.batch, seed_base + (step + 1) * sched.batch))
        batch = batcher.examples(seeds)
        # The ViT runs outside the model call so only the decoder is asked for attention maps.
        batch["image_embeds"] = model.model.visual(batch.pop("pixel_values"),
                                                   grid_thw=batch["image_grid_thw"]).pooler_output
        loss = lm_loss(model, batch, sched.route_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        opt.step()
        running.append(loss.item())
        done = sched.route_steps + step + 1
        if (step + 1) % sched.eval_every == 0 or done == total:
            log_point(done, val["chunks"])
    return {"steps": done, **phase2_metrics(model, val["chunks"])}


def _lm_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")}
    if "image_embeds" in batch:  # merger output computed earlier by the frozen ViT
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=(batch["image_embeds"],))}
    else:
        kwargs["pixel_values"] = batch["pixel_values"]
    return kwargs


def lm_loss(model, batch: dict[str, Any], route_weight: float = 0.0):
    """LM loss on the answer tokens, plus ``route_weight`` x the routing loss: one attention head of
    the last decoder layer (``ROUTE_HEAD``) is told which image token holds the digit it must
    write next. The decoder finds the answer tokens among 72 image tokens far sooner with it
    (a direct objective for routing, as phase 1 is for reading)."""
    import torch

    model.model.rope_deltas = None
    out = model(**_lm_inputs(batch), use_cache=False, output_attentions=route_weight > 0)
    logits = out.logits  # [B, T, V]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    if route_weight > 0:
        attn = out.attentions[-1][:, ROUTE_HEAD]  # [B, T, T] eager attention probabilities
        page, query, key = batch["route"].unbind(-1)
        loss = loss - route_weight * (attn[page, query, key] + 1e-6).log().mean()
    return loss


def phase2_metrics(model, val_batches: list[dict[str, Any]]) -> dict[str, float]:
    """Teacher-forced: token accuracy on the answer (+ end) and exact match (all tokens argmax-right,
    which is what greedy decoding returns)."""
    import torch

    model.eval()
    right, total, exact, n = 0, 0, 0, 0
    with torch.no_grad():
        for b in val_batches:
            model.model.rope_deltas = None
            logits = model(**_lm_inputs(b), use_cache=False).logits
            labels = b["labels"][:, 1:]
            ok = (logits[:, :-1].argmax(-1) == labels) | (labels == -100)
            scored = labels != -100
            right += int((ok & scored).sum())
            total += int(scored.sum())
            exact += int(ok.all(-1).sum())
            n += labels.shape[0]
    model.train()
    return {"token_acc": right / total, "teacher_forced_exact": exact / n}


# ---------------------------------------------------------------------------------------------- eval

def evaluate(model_dir: Path, n: int, threads: int, task: Task = TASKS["invoice"]) -> dict[str, Any]:
    """Exact match of transformers' greedy ``generate`` on ``n`` held-out pages of ``task`` (parity
    reference inputs)."""
    from qvl_export.demo.accuracy import exact_match
    from qvl_export.parity.reference import TorchReference

    ref = TorchReference(model_dir, num_threads=threads)
    result = exact_match(ref.reader(task.max_new_tokens), n, task=task)
    for key in ("seconds", "expected"):
        result.pop(key)
    return result


def write_sample(sample_dir: Path, index: int, task: Task = TASKS["invoice"], name: str = "invoice") -> None:
    """Ship held-out page ``index`` (one the model reads right) as NAME.png + NAME.json."""
    seed = task.heldout_seed_offset + index
    image, prompt, answer = task.make_example(seed)
    sample_dir.mkdir(parents=True, exist_ok=True)
    image.save(sample_dir / f"{name}.png")
    (sample_dir / f"{name}.json").write_text(json.dumps({"seed": seed, "prompt": prompt, "answer": answer},
                                                        indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- main

def train(out: Path, minutes: float, threads: int, sched: Schedule, dims: CheckpointDims | None = None,
          sample_dir: Path | None = None, task: TrainTask = TRAIN_TASKS["invoice"]) -> dict:
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast

    from qvl_export.loading.config import parse_model_config

    dims = dims or task.dims
    t_start = time.monotonic()
    cpu_start = time.process_time()
    load_start = os.getloadavg()[0]
    budget = minutes * 60.0
    torch.set_num_threads(threads)
    torch.manual_seed(dims.seed)
    random.seed(dims.seed)
    transformers.utils.logging.disable_progress_bar()

    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(dims.tokenizer_vocab, dims.seed)
    config, model_cls = build_model_config(dims, tok)
    config.architectures = [model_cls.__name__]
    config.save_pretrained(out)  # so our parser gives the specs the runtime will use
    write_processing_files(out, tok, dims)
    spec = parse_model_config(out)
    tok_fast = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"),
                                       chat_template=dims.chat_template or CHAT_TEMPLATE,
                                       eos_token="<|im_end|>", pad_token="<|endoftext|>")

    # sdpa for training speed (the same math as eager, see parity/reference.py)
    model = model_cls._from_config(config, attn_implementation="sdpa")
    linear_patch_embed(model.model.visual)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %d parameters (%.1f MB fp32)", n_params, n_params * 4 / 1e6)

    batcher = Batcher(tok_fast, spec, task)
    chunks = [batcher.examples(list(range(s, s + sched.batch)))
              for s in range(VAL_SEED_OFFSET, VAL_SEED_OFFSET + sched.val_size, sched.batch)]
    val = {"digits": torch.cat([c["digits"] for c in chunks]), "chunks": chunks}
    curve: list[dict[str, Any]] = []

    t1 = time.monotonic()
    p1 = run_phase1(model, batcher, sched, val, t_start + 0.50 * budget, curve)
    t2 = time.monotonic()
    p2 = run_phase2(model, batcher, sched, val, t_start + 0.88 * budget, curve,
                    seed_base=sched.phase1_steps * sched.batch)
    t3 = time.monotonic()

    model.eval()
    model.save_pretrained(out)
    write_processing_files(out, tok, dims)
    t4 = time.monotonic()
    result = evaluate(out, sched.heldout, threads, task.task)
    t5 = time.monotonic()
    report = {
        "task": task.task.name,
        "metric": "exact match of transformers greedy generate (fp32) on held-out pages",
        **result,
        "phase1": p1,
        "phase2": p2,
        "curve": curve,
        "seconds": {"setup": round(t1 - t_start, 1), "phase1": round(t2 - t1, 1), "phase2": round(t3 - t2, 1),
                    "save": round(t4 - t3, 1), "eval": round(t5 - t4, 1), "total": round(t5 - t_start, 1),
                    # CPU time of this process: what the run costs on an otherwise idle machine
                    "process_cpu": round(time.process_time() - cpu_start, 1)},
        "load_average": {"start": load_start, "end": os.getloadavg()[0]},  # other jobs on the machine
        "threads": threads,
        "minutes_budget": minutes,
        "schedule": asdict(sched),
        "parameters": n_params,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    correct = report.pop("correct_indices")
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    if sample_dir is not None and correct:
        write_sample(sample_dir, correct[0], task.task, task.sample_name)
    log.info("held-out exact match %.3f on %d pages; total %.0f s", result["exact_match"], sched.heldout,
             t5 - t_start)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--task", choices=sorted(TRAIN_TASKS), default="invoice",
                        help="invoice: the built-in demo checkpoint (default); form: the form reader; "
                             "chart: the chart reader")
    parser.add_argument("--minutes", type=float, default=18.0, help="wall-time guard for training (default 18)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--samples", type=Path, default=None,
                        help="also write a held-out page the model reads right here (TASK.png/.json)")
    for name, value in asdict(Schedule()).items():  # default: the task's schedule
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    task = TRAIN_TASKS[args.task]
    sched = replace(task.schedule, **{k: getattr(args, k) for k in asdict(task.schedule)
                                      if getattr(args, k) is not None})
    train(args.out, args.minutes, args.threads, sched, sample_dir=args.samples, task=task)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
