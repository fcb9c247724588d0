"""The transformers reference must itself be right: image pads, M-RoPE, prefill vs generate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qvl_export.core.errors import QvlError
from qvl_export.parity.reference import ReferenceCase, TorchReference

REPO = Path(__file__).resolve().parents[2]


def _image_tokens(grid_thw: np.ndarray) -> int:
    return int(sum(t * h * w // 4 for t, h, w in grid_thw))


def test_import_is_cheap():
    code = "import sys, qvl_export.parity.reference; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_prompt_has_images_first(torch_reference, two_image_case):
    prompt = torch_reference.build_prompt(two_image_case)
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    assert prompt.count(pad) == 2
    assert prompt.index(pad) < prompt.index(two_image_case.prompt)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_image_pads_and_merger_rows(torch_reference, two_image_result):
    r = two_image_result
    thw = r.image_grid_thw  # int64 [2, 3]
    assert thw.shape == (2, 3) and thw.dtype == np.int64
    assert not np.array_equal(thw[0], thw[1]), "the two images must have different grids"
    n_tokens = _image_tokens(thw)
    assert int((r.input_ids == torch_reference.image_token_id).sum()) == n_tokens
    assert r.merger_out.shape == (n_tokens, torch_reference.model.config.get_text_config().hidden_size)
    n_patches = int(thw.prod(-1).sum())
    assert r.pixel_values.shape == (n_patches, 1176) and r.pixel_values.dtype == np.float32
    assert r.vision_hidden.shape[0] == n_patches
    assert r.merger_out.dtype == np.float32 and np.isfinite(r.merger_out).all()


def test_step0_logits_equal_prefill(two_image_result):
    r = two_image_result
    assert r.prefill_logits.shape[0] == r.input_ids.shape[0]
    diff = np.abs(r.step_logits[0] - r.prefill_logits[-1]).max()
    assert diff < 1e-4, diff
    assert r.step0_prefill_max_abs == pytest.approx(diff, abs=1e-6)


def test_generated_ids_are_argmax_of_raw_logits(two_image_result):
    r = two_image_result
    assert 1 <= r.generated_ids.shape[0] <= 6
    assert r.step_logits.shape == (r.generated_ids.shape[0], r.prefill_logits.shape[1])
    np.testing.assert_array_equal(r.generated_ids, r.step_logits.argmax(-1))


def test_mrope_positions_applied(torch_reference, two_image_result):
    r = two_image_result
    T = r.input_ids.shape[0]
    assert r.position_ids.shape == (3, T) and r.position_ids.dtype == np.int64
    assert not np.array_equal(r.position_ids, np.broadcast_to(np.arange(T), (3, T)))
    image = r.input_ids == torch_reference.image_token_id
    assert (r.position_ids[1:, image] != r.position_ids[0, image]).any()  # h / w differ from t
    assert np.array_equal(r.position_ids[0, ~image], r.position_ids[2, ~image])  # text: t = h = w
    assert r.rope_delta == int(r.position_ids.max()) + 1 - T
    assert r.rope_delta < 0


def test_decode_positions_are_cache_length_plus_delta(torch_reference, two_image_case, two_image_result):
    """A no-cache forward over prompt + generated tokens with positions (cache_len + rope_delta)
    reproduces every step's logits: M-RoPE is 1-D after the prefill."""
    import torch

    r = two_image_result
    inputs = torch_reference.prepare(two_image_case)
    T, N = r.input_ids.shape[0], r.generated_ids.shape[0]
    full_ids = torch.from_numpy(np.concatenate([r.input_ids, r.generated_ids]))[None]  # [1, T+N]
    decode = np.broadcast_to(np.arange(T, T + N) + r.rope_delta, (3, N))
    positions = torch.from_numpy(np.concatenate([r.position_ids, decode], axis=1))[:, None, :]  # [3, 1, T+N]
    with torch.inference_mode():
        out = torch_reference.model(input_ids=full_ids, pixel_values=inputs.pixel_values,
                                    image_grid_thw=inputs.image_grid_thw, position_ids=positions, use_cache=False)
    logits = out.logits[0, T - 1:T + N - 1].float().numpy()  # [N, V]
    assert np.abs(logits - r.step_logits).max() < 1e-4


def test_omitting_mm_token_type_ids_changes_logits(torch_reference, two_image_case, two_image_result):
    """The pitfall: without mm_token_type_ids, transformers does not apply M-RoPE to image tokens."""
    inputs = torch_reference.prepare(two_image_case)
    good = two_image_result.prefill_logits
    # generate: silently falls back to 1-D positions in both families.
    _, bad_steps = torch_reference.generate(inputs, 1, with_mm_token_type_ids=False)
    assert np.abs(bad_steps[0].float().numpy() - good[-1]).max() > 1e-2
    # forward: Qwen2-VL refuses (ValueError), Qwen2.5-VL silently uses 1-D positions.
    try:
        bad = torch_reference.prefill_logits(inputs, with_mm_token_type_ids=False).float().numpy()
    except ValueError as err:
        assert "mm_token_type_ids" in str(err)
    else:
        assert np.abs(bad - good).max() > 1e-2
    # ... and the reference is not left in a bad state.
    again = torch_reference.prefill_logits(inputs).float().numpy()
    assert np.abs(again - good).max() < 1e-5


def test_text_only(torch_reference):
    r = torch_reference.run(ReferenceCase(name="text", images=[], prompt="Read the invoice total.",
                                          max_new_tokens=3))
    assert r.pixel_values is None and r.image_grid_thw is None
    assert r.vision_hidden is None and r.merger_out is None
    T = r.input_ids.shape[0]
    assert not (r.input_ids == torch_reference.image_token_id).any()
    np.testing.assert_array_equal(r.position_ids, np.broadcast_to(np.arange(T), (3, T)))
    assert r.rope_delta == 0
    assert np.abs(r.step_logits[0] - r.prefill_logits[-1]).max() < 1e-4
    np.testing.assert_array_equal(r.generated_ids, r.step_logits.argmax(-1))


def test_pixel_overrides_change_grid(torch_reference, noise_image):
    image = noise_image(300, 420, 2)
    small = torch_reference.prepare(ReferenceCase("s", [image], "x", max_pixels=56 * 56))
    large = torch_reference.prepare(ReferenceCase("l", [image], "x", min_pixels=28 * 28 * 300))
    s_hw = int(small.image_grid_thw.prod()) * 14 * 14
    l_hw = int(large.image_grid_thw.prod()) * 14 * 14
    assert s_hw <= 56 * 56 < l_hw and l_hw >= 28 * 28 * 300


def test_tied_embeddings_checkpoint_loads(tied_checkpoint, two_image_case):
    from safetensors import safe_open

    with safe_open(str(tied_checkpoint / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    ref = TorchReference(tied_checkpoint)
    assert ref.model.lm_head.weight.data_ptr() == ref.model.get_input_embeddings().weight.data_ptr()
    r = ref.run(ReferenceCase("tied", two_image_case.images[:1], "Total?", max_new_tokens=2))
    assert np.abs(r.step_logits[0] - r.prefill_logits[-1]).max() < 1e-4


def test_hub_sampling_settings_do_not_leak_into_greedy(tied_checkpoint, tmp_path):
    """Hub generation configs carry repetition_penalty / top_k; the reference stays plain greedy."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tied_checkpoint, ckpt)
    gen = json.loads((ckpt / "generation_config.json").read_text())
    gen.update(do_sample=True, repetition_penalty=3.0, temperature=0.1, top_k=1, top_p=0.001)
    (ckpt / "generation_config.json").write_text(json.dumps(gen))
    ref = TorchReference(ckpt)
    assert ref.checkpoint_generation_config.repetition_penalty == 3.0
    r = ref.run(ReferenceCase("greedy", [], "Total total total total?", max_new_tokens=8))
    np.testing.assert_array_equal(r.generated_ids, r.step_logits.argmax(-1))


def test_unsupported_architecture_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(QvlError, match="Unsupported architecture"):
        TorchReference(tmp_path)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_bf16_checkpoint_reference_keeps_weights_bf16_and_float32_results(family, checkpoint, tmp_path):
    """A float32 reference of a bf16 checkpoint holds the weights in bf16 (half the memory) and widens
    each module's own while it runs: every result equals, bit for bit, the reference that widens every
    weight at load - and differs from a plain bf16 reference."""
    import torch

    from qvl_export.bench.checkpoint import convert_checkpoint
    from qvl_export.parity.gate import reference_case
    from qvl_export.parity.reference import stored_float_dtype
    from qvl_export.parity.samples import ALL_CASES

    bf16 = convert_checkpoint(checkpoint(family), tmp_path / "bf16")
    assert (stored_float_dtype(bf16), stored_float_dtype(checkpoint(family))) == ("bfloat16", None)
    lean, full = TorchReference(bf16), TorchReference(bf16, stored_weights=False)
    plain = TorchReference(bf16, dtype="bfloat16")
    assert lean.resident_dtype == "bfloat16" and full.resident_dtype is None
    def wide_params():  # only the first weight of each transformers model (what its .dtype reads) is float32
        return [n for n, p in lean.model.named_parameters() if p.dtype != torch.bfloat16]

    kept = wide_params()
    assert 1 <= len(kept) <= 3 and len(list(lean.model.parameters())) > 20, kept
    cases = [c for c in ALL_CASES if c.name in ("two-images", "text-only", "video")]
    for case in cases:
        a, _ = reference_case(lean, case, 8)
        b, _ = reference_case(full, case, 8)
        c, _ = reference_case(plain, case, 8)
        fields = [k for k, v in vars(b).items() if isinstance(v, np.ndarray)]
        assert "prefill_logits" in fields and "step_logits" in fields
        for k in fields:
            np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=f"{case.name} {k}")
        assert not np.array_equal(c.prefill_logits, b.prefill_logits)
    assert wide_params() == kept  # every widened weight was given back in bf16


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_bf16_reference_never_widens_a_whole_token_table_or_lm_head(family, checkpoint, tmp_path, monkeypatch):
    """The lean reference keeps the token table in bf16 (the gathered rows are widened) and computes a
    large lm_head from widened slices of rows: with a slice limit below the tiny lm_head, it is computed
    in several slices, no float32 copy of the whole table is ever made, the logits match the reference
    that widens at load to float32 rounding, and the greedy tokens are the same."""
    import torch

    from qvl_export.bench.checkpoint import convert_checkpoint
    from qvl_export.parity import reference as ref_mod
    from qvl_export.parity.gate import reference_case
    from qvl_export.parity.samples import ALL_CASES

    bf16 = convert_checkpoint(checkpoint(family), tmp_path / "bf16")
    config = json.loads((bf16 / "config.json").read_text())
    text = config.get("text_config", config)
    lm_head_bytes = text["vocab_size"] * text["hidden_size"] * 4
    slice_bytes = lm_head_bytes // 3 + 1  # three slices, the last one short
    full = TorchReference(bf16, stored_weights=False)
    monkeypatch.setattr(ref_mod, "WIDEN_SLICE_BYTES", slice_bytes)
    real_linear = torch.nn.functional.linear
    widest = []

    def watched(x, w, b=None):
        widest.append(w.shape[0])
        return real_linear(x, w, b)

    lean = TorchReference(bf16)
    table = lean.model.get_input_embeddings().weight
    assert table.dtype == torch.bfloat16
    monkeypatch.setattr(torch.nn.functional, "linear", watched)
    case = next(c for c in ALL_CASES if c.name == "two-images")
    a, _ = reference_case(lean, case, 8)
    monkeypatch.setattr(torch.nn.functional, "linear", real_linear)
    b, _ = reference_case(full, case, 8)
    assert table.dtype == torch.bfloat16 and lean.model.get_input_embeddings().weight is table
    assert text["vocab_size"] not in widest and max(widest) < text["vocab_size"]  # the lm_head came in slices
    np.testing.assert_array_equal(a.generated_ids, b.generated_ids)
    for k in ("prefill_logits", "step_logits"):
        np.testing.assert_allclose(getattr(a, k), getattr(b, k), rtol=0, atol=1e-5, err_msg=k)
    np.testing.assert_array_equal(a.merger_out, b.merger_out)


def test_reference_weights_option_reaches_the_reference(checkpoint, tmp_path):
    """``qvl-export parity --reference-weights float32`` widens at load; the default holds bf16 as stored
    (the gate's report is the same either way)."""
    from click.testing import CliRunner

    from qvl_export.bench.checkpoint import convert_checkpoint
    from qvl_export.building.artifacts import build
    from qvl_export.cli import main

    bf16 = convert_checkpoint(checkpoint("qwen2_vl"), tmp_path / "bf16")
    out = tmp_path / "art"
    build(bf16, out)
    held = {}
    for choice in ("stored", "float32"):
        result = CliRunner().invoke(main, ["parity", str(out), "--reference", str(bf16), "--quick",
                                           "--reference-weights", choice], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        held[choice] = json.loads((out / "report.json").read_text())["meta"]["reference_weights_held_as"]
    assert held == {"stored": "bfloat16", "float32": "float32"}
