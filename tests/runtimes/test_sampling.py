"""The thin runtime's next-token choice against transformers' own logits processors, and the checkpoint's
generation settings (generation_config.json) against transformers' defaults."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from qvl_export.core.errors import QvlError
from qvl_export.core.spec import GenerationSpec
from qvl_export.loading.generation import parse_generation_config
from qvl_export.runtimes.sampling import SamplingParams, choose_token, process_logits

V = 500


def _case(seed: int, vocab: int = V):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(vocab) * rng.uniform(1.0, 5.0)).astype(np.float32)
    # repeats, the current argmax, and a negative-scored id in the history
    history = [*rng.integers(0, vocab, 40).tolist(), *rng.integers(0, 10, 20).tolist(),
               int(np.argmax(logits)), int(np.argmin(logits))]
    return logits, history


def _transformers_scores(logits: np.ndarray, history, p: SamplingParams) -> np.ndarray:
    """Run transformers' processors the way generate builds them (batch of one, no beams)."""
    import torch
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = []
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty)))
    if p.do_sample:
        if p.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(float(p.temperature)))
        if p.top_k != 0:
            procs.append(TopKLogitsWarper(top_k=p.top_k, min_tokens_to_keep=1))
        if p.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=p.top_p, min_tokens_to_keep=1))
    ids = torch.tensor([list(history)], dtype=torch.long)
    scores = torch.from_numpy(logits.copy())[None]
    for proc in procs:
        scores = proc(ids, scores)
    return scores[0].numpy()


def _assert_same(ours: np.ndarray, ref: np.ndarray):
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref), err_msg="kept sets differ")
    kept = np.isfinite(ref)
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------- processors


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("penalty", [1.0, 1.05, 1.3])
def test_process_logits_matches_transformers(seed, penalty):
    logits, history = _case(seed)
    for top_k, top_p, temperature in itertools.product([0, 1, 5, 50], [0.3, 0.9, 1.0], [0.7, 1.0, 1.3]):
        p = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=penalty,
                           do_sample=True)
        ours = process_logits(logits, history, p)
        ref = _transformers_scores(logits, history, p)
        _assert_same(ours, ref)
        # what we actually see: the same float32 ops give the same bits
        np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(logits, _case(seed)[0])  # the input is not modified


@pytest.mark.parametrize("penalty", [1.05, 1.3, 0.8])
def test_greedy_with_repetition_penalty_is_argmax_of_transformers_scores(penalty):
    for seed in range(20):
        logits, history = _case(seed)
        p = SamplingParams(temperature=0.3, top_p=0.5, top_k=3, repetition_penalty=penalty, do_sample=False)
        ref = _transformers_scores(logits, history, p)  # greedy: only the penalty applies
        ours = process_logits(logits, history, p)
        _assert_same(ours, ref)
        assert np.isfinite(ours).all()  # no warper ran
        assert choose_token(logits, history, p, np.random.default_rng(0)) == int(np.argmax(ref))


def test_repetition_penalty_changes_the_greedy_choice_and_covers_the_prompt():
    logits = np.array([0.0, 3.0, 2.9, -1.0, 1.0], dtype=np.float32)
    p = SamplingParams(repetition_penalty=1.3)
    rng = np.random.default_rng(0)
    assert choose_token(logits, [], p, rng) == 1
    assert choose_token(logits, [1], p, rng) == 2  # 3.0 / 1.3 < 2.9
    assert choose_token(logits, [1, 1, 1], p, rng) == 2  # once per distinct id, not per occurrence
    np.testing.assert_array_equal(process_logits(logits, [1, 1, 1], p), process_logits(logits, [1], p))
    out = process_logits(logits, [3, 0], p)
    assert out[3] == np.float32(-1.0) * np.float32(1.3) and out[0] == 0.0  # negative scores are multiplied


def test_history_ids_outside_the_vocabulary_are_ignored_as_transformers_does():
    logits, history = _case(7, vocab=64)
    history = [*history[:10], 64, 70, 1000]  # e.g. embedding rows beyond the lm_head
    p = SamplingParams(repetition_penalty=1.3, do_sample=False)
    ours = process_logits(logits, history, p)
    _assert_same(ours, _transformers_scores(logits, history, p))
    np.testing.assert_array_equal(ours, process_logits(logits, history[:10], p))


def test_top_p_with_ties_keeps_as_many_tokens_as_transformers():
    """Equal scores straddling the nucleus edge: torch's unstable sort picks which of them survive; the count
    is the same (documented difference)."""
    for seed in range(10):
        rng = np.random.default_rng(seed)
        logits = (np.round(rng.standard_normal(V) * 2) / 2).astype(np.float32)
        for top_p in (0.3, 0.5, 0.9):
            p = SamplingParams(top_p=top_p, top_k=0, do_sample=True)
            ours, ref = process_logits(logits, [], p), _transformers_scores(logits, [], p)
            assert np.isfinite(ours).sum() == np.isfinite(ref).sum()
            np.testing.assert_array_equal(np.sort(ours), np.sort(ref))


# ------------------------------------------------------------------------------------------------- sampling


def test_sampling_is_reproducible_and_stays_in_the_kept_set():
    logits, history = _case(11)
    p = SamplingParams(temperature=1.3, top_p=0.9, top_k=50, repetition_penalty=1.05, do_sample=True)
    kept = set(np.flatnonzero(np.isfinite(_transformers_scores(logits, history, p))).tolist())
    assert 1 < len(kept) <= 50

    def draw(seed, n=300):
        rng = np.random.default_rng(seed)
        return [choose_token(logits, history, p, rng) for _ in range(n)]

    a, b = draw(123), draw(123)
    assert a == b
    assert set(a) <= kept
    assert len(set(a)) > 1  # it does sample
    assert draw(124) != a


def test_top_k_1_sampling_returns_the_argmax():
    for seed in range(10):
        logits, history = _case(seed)
        p = SamplingParams(temperature=1.3, top_p=1.0, top_k=1, repetition_penalty=1.3, do_sample=True)
        best = int(np.argmax(_transformers_scores(logits, history, SamplingParams(repetition_penalty=1.3))))
        rng = np.random.default_rng(seed)
        assert {choose_token(logits, history, p, rng) for _ in range(50)} == {best}


def test_tiny_top_p_sampling_returns_the_argmax():
    """Qwen2-VL-7B-Instruct ships top_k=1, top_p=0.001: sampling that is greedy in effect."""
    logits, history = _case(5)
    p = SamplingParams(temperature=0.01, top_p=0.001, top_k=0, repetition_penalty=1.05, do_sample=True)
    greedy = SamplingParams(repetition_penalty=1.05)
    rng = np.random.default_rng(0)
    assert {choose_token(logits, history, p, rng) for _ in range(20)} == {choose_token(logits, history, greedy, rng)}


# ------------------------------------------------------------------------------------- generation_config.json


def _write(tmp_path, data) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps(data), encoding="utf-8")


def test_defaults_follow_transformers():
    from transformers import GenerationConfig

    from qvl_export.loading.generation import TRANSFORMERS_DEFAULTS

    ref = GenerationConfig._get_default_generation_params()
    assert {k: ref[k] for k in TRANSFORMERS_DEFAULTS} == TRANSFORMERS_DEFAULTS


def test_missing_file_gives_transformers_defaults_and_the_fallback_eos(tmp_path):
    spec = parse_generation_config(tmp_path, (151645, 151643))
    assert spec == GenerationSpec(do_sample=False, temperature=1.0, top_p=1.0, top_k=50, repetition_penalty=1.0,
                                  eos_token_ids=(151645, 151643), max_new_tokens=None)


def test_list_eos_and_sampling_settings(tmp_path):
    _write(tmp_path, {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                      "eos_token_id": [151645, 151643, 151645], "repetition_penalty": 1.05, "temperature": 0.1,
                      "top_p": 0.001, "top_k": 1, "max_new_tokens": 256, "transformers_version": "4.49.0"})
    spec = parse_generation_config(tmp_path, (7,))
    assert spec == GenerationSpec(do_sample=True, temperature=0.1, top_p=0.001, top_k=1, repetition_penalty=1.05,
                                  eos_token_ids=(151645, 151643), max_new_tokens=256)


def test_int_eos_ints_as_floats_and_nulls_as_missing(tmp_path):
    _write(tmp_path, {"eos_token_id": 151643, "temperature": 1, "repetition_penalty": 2, "top_k": None,
                      "top_p": None})
    spec = parse_generation_config(tmp_path, (7,))
    assert spec.eos_token_ids == (151643,)
    assert spec.temperature == 1.0 and isinstance(spec.temperature, float)
    assert spec.repetition_penalty == 2.0 and isinstance(spec.repetition_penalty, float)
    assert spec.top_k == 50 and spec.top_p == 1.0 and spec.do_sample is False


def test_file_without_eos_uses_the_fallback(tmp_path):
    _write(tmp_path, {"do_sample": True})
    spec = parse_generation_config(tmp_path, (3, 4))
    assert spec.eos_token_ids == (3, 4) and spec.do_sample is True and spec.top_k == 50


@pytest.mark.parametrize("key,value", [
    ("temperature", -0.5), ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5), ("top_p", -0.1),
    ("top_k", -1), ("top_k", 2.5), ("top_k", True), ("repetition_penalty", 0), ("repetition_penalty", -1.05),
    ("do_sample", "yes"), ("max_new_tokens", 0), ("eos_token_id", "</s>"), ("eos_token_id", [1, -2]),
])
def test_bad_values_raise_one_line_naming_file_key_and_value(tmp_path, key, value):
    _write(tmp_path, {key: value})
    with pytest.raises(QvlError) as err:
        parse_generation_config(tmp_path, (1,))
    msg = str(err.value)
    assert "\n" not in msg
    assert "generation_config.json" in msg and key in msg and repr(value) in msg and "use " in msg


def test_invalid_json_is_a_qvl_error(tmp_path):
    (tmp_path / "generation_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(QvlError, match="generation_config.json"):
        parse_generation_config(tmp_path, (1,))


def test_spec_round_trips_through_json_and_ignores_unknown_keys():
    spec = GenerationSpec(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
                          eos_token_ids=(151645, 151643), max_new_tokens=64)
    d = json.loads(json.dumps(spec.to_dict()))
    assert d["eos_token_ids"] == [151645, 151643]
    assert GenerationSpec.from_dict(d) == spec
    assert GenerationSpec.from_dict({**d, "min_p": 0.1, "future_key": [1]}) == spec
    assert GenerationSpec.from_dict({}) == GenerationSpec()


# ------------------------------------------------------------------------------------------ SamplingParams


CKPT = GenerationSpec(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
                      eos_token_ids=(2,))


def test_from_spec_without_overrides_keeps_the_checkpoint():
    assert SamplingParams.from_spec(CKPT) == SamplingParams(0.7, 0.8, 20, 1.05, True)
    assert SamplingParams.from_spec(CKPT, temperature=None, top_p=None, top_k=None, repetition_penalty=None,
                                    do_sample=None) == SamplingParams(0.7, 0.8, 20, 1.05, True)


def test_from_spec_temperature_zero_is_greedy_and_positive_is_sampling():
    greedy = SamplingParams.from_spec(CKPT, temperature=0)
    assert greedy.do_sample is False and greedy.repetition_penalty == 1.05  # the penalty still applies
    sampling = SamplingParams.from_spec(GenerationSpec(), temperature=0.9)
    assert sampling.do_sample is True and sampling.temperature == 0.9
    assert sampling.top_k == 0  # GenerationSpec() itself; parse_generation_config gives 50 when unset
    explicit = SamplingParams.from_spec(GenerationSpec(), temperature=0.9, do_sample=False)
    assert explicit.do_sample is False  # an explicit do_sample wins, as in transformers


def test_from_spec_overrides_each_setting():
    p = SamplingParams.from_spec(CKPT, top_p=0.95, top_k=0, repetition_penalty=1.0)
    assert p == SamplingParams(0.7, 0.95, 0, 1.0, True)
    assert SamplingParams.from_spec(CKPT, do_sample=False).do_sample is False


def test_checkpoint_sampling_at_temperature_zero_runs_greedy():
    spec = GenerationSpec(do_sample=True, temperature=0.0)
    assert SamplingParams.from_spec(spec).do_sample is False


@pytest.mark.parametrize("key,value", [("temperature", -1.0), ("top_p", 0.0), ("top_p", 2.0), ("top_k", -3),
                                       ("top_k", 1.5), ("repetition_penalty", 0.0)])
def test_from_spec_rejects_bad_overrides(key, value):
    with pytest.raises(QvlError, match=key):
        SamplingParams.from_spec(CKPT, **{key: value})


def test_runtime_modules_import_neither_torch_nor_transformers():
    import ast
    from pathlib import Path

    import qvl_export.loading.generation as gen
    import qvl_export.runtimes.sampling as smp

    for mod in (gen, smp):
        tree = ast.parse(Path(mod.__file__).read_text(encoding="utf-8"))
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not names & {"torch", "transformers"}, mod.__name__
