"""Next-token choice with the logits processors transformers' ``generate`` applies (numpy only).

Order and semantics follow ``GenerationMixin._get_logits_processor`` and ``generation/logits_process.py``
(transformers 5.24) for a batch of one, no beams:

1. ``RepetitionPenaltyLogitsProcessor`` (when ``repetition_penalty != 1``), in greedy *and* sampling mode, over
   every distinct id of the history: the prompt (image pad tokens included) and the tokens generated so far.
   A penalised score ``s`` becomes ``s * penalty`` if ``s < 0`` else ``s / penalty``; ids outside the vocabulary
   are ignored.
2. Sampling only (``do_sample``): ``TemperatureLogitsWarper`` (when ``temperature != 1``), ``TopKLogitsWarper``
   (when ``top_k != 0``; ties with the k-th score are kept), ``TopPLogitsWarper`` (when ``top_p < 1``,
   ``min_tokens_to_keep=1``), then a draw from the softmax of what is left.
3. Greedy: the argmax of the processed scores (the first one on ties, as ``torch.argmax``).

Precision: scores stay float32 throughout, as ``generate`` casts the last logits to float32 and every processor
computes in the tensor's dtype with the Python scalar rounded to float32 (NumPy 2 promotes the same way). The one
place torch does not compute in float32 is ``cumsum`` on CPU, which accumulates in float64 and rounds each
partial sum to float32; top-p does the same here, so the kept set matches torch on CPU to the last bit of the
cumulative sum. Deliberate differences:

- ``temperature=0`` means greedy here (transformers raises for ``TemperatureLogitsWarper(0.0)``).
- Ties in the top-p sort are broken by a stable sort (lower id first in ascending order); torch's sort makes no
  such promise. It only matters when equal scores straddle the nucleus boundary.
- torch on CUDA divides by a scalar through its reciprocal and scans in float32, so a CUDA reference can differ
  from this (and from torch on CPU) by an ulp at the edges.
- The draw uses NumPy's generator (inverse CDF over the kept ids, float64 probabilities), so a seed reproduces
  this runtime's choices, not torch.multinomial's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from qvl_export.core.errors import QvlError
from qvl_export.core.spec import GenerationSpec, check_value


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    do_sample: bool = False

    @classmethod
    def from_spec(cls, spec: GenerationSpec, *, temperature: float | None = None, top_p: float | None = None,
                  top_k: int | None = None, repetition_penalty: float | None = None,
                  do_sample: bool | None = None, where: str = "the generation settings") -> SamplingParams:
        """The checkpoint's settings with the caller's overrides (None keeps the checkpoint's value).

        An explicit ``temperature=0`` means greedy; an explicit ``temperature > 0`` means sampling (unless
        ``do_sample=False`` is passed too, which wins, as in transformers). A checkpoint that asks for sampling
        at temperature 0 is run greedy.
        """
        params = cls(spec.temperature, spec.top_p, spec.top_k, spec.repetition_penalty, spec.do_sample)
        given = {"temperature": temperature, "top_p": top_p, "top_k": top_k,
                 "repetition_penalty": repetition_penalty, "do_sample": do_sample}
        given = {k: check_value(k, v, where) for k, v in given.items() if v is not None}
        if "temperature" in given and "do_sample" not in given:
            given["do_sample"] = given["temperature"] > 0
        params = replace(params, **given)
        if params.do_sample and params.temperature == 0:
            params = replace(params, do_sample=False)
        return params


def _penalise(scores: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    ids = np.unique(np.asarray(history, dtype=np.int64).reshape(-1))
    ids = ids[(ids >= 0) & (ids < scores.shape[-1])]
    s = scores[ids]
    scores[ids] = np.where(s < 0, s * np.float32(penalty), s / np.float32(penalty))
    return scores


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(max(k, 1), scores.shape[-1])
    kth = np.partition(scores, scores.shape[-1] - k)[scores.shape[-1] - k]
    scores[scores < kth] = -np.inf
    return scores


def _softmax32(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum(dtype=np.float32)


def _top_p(scores: np.ndarray, top_p: float) -> np.ndarray:
    order = np.argsort(scores, kind="stable")  # ascending, as TopPLogitsWarper
    probs = _softmax32(scores[order])
    cum = np.cumsum(probs, dtype=np.float64).astype(np.float32)  # torch CPU cumsum: float64 accumulator
    remove = cum <= np.float32(1.0 - top_p)
    remove[-1] = False  # min_tokens_to_keep = 1
    scores[order[remove]] = -np.inf
    return scores


def process_logits(logits: np.ndarray, history: Sequence[int], params: SamplingParams) -> np.ndarray:
    """The scores ``generate`` would sample from (or take the argmax of): float32 [V], -inf where filtered."""
    scores = np.array(logits, dtype=np.float32).reshape(-1)  # a copy
    if params.repetition_penalty != 1.0 and len(history):
        scores = _penalise(scores, history, params.repetition_penalty)
    if not params.do_sample:
        return scores
    if params.temperature == 0:
        raise QvlError("temperature=0 with sampling on; use greedy decoding (do_sample off) or a temperature > 0.")
    if params.temperature != 1.0:
        scores = scores / np.float32(params.temperature)
    if params.top_k != 0:
        scores = _top_k(scores, params.top_k)
    if params.top_p < 1.0:
        scores = _top_p(scores, params.top_p)
    return scores


def choose_token(logits: np.ndarray, history: Sequence[int], params: SamplingParams,
                 rng: np.random.Generator) -> int:
    """The next token: argmax of the processed scores (greedy) or a draw from their softmax (sampling)."""
    scores = process_logits(logits, history, params)
    if not params.do_sample:
        return int(np.argmax(scores))
    kept = np.flatnonzero(np.isfinite(scores))
    if kept.size == 0:
        raise QvlError("every next-token score is -inf or NaN; the model produced invalid logits.")
    z = scores[kept].astype(np.float64)
    p = np.exp(z - z.max())
    cdf = np.cumsum(p)
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(kept[min(i, kept.size - 1)])
