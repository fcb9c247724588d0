"""``qvl-export parity``: artifacts vs the transformers reference, stage by stage, as a gate.

Stages per case: prompt (token ids and M-RoPE positions identical), preprocess (patches),
vision (encoder output), merger (image embeddings), deepstack (Qwen3-VL's DeepStack features, gated
as the merger), prefill (last-position logits), steps (the
logits of every greedy step both sides took on the same prefix) and greedy (new tokens identical).
The pass rule is written in ``gates.json`` per precision: every check of every case must pass.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

from qvl_export.demo import task_for, task_reference
from qvl_export.core.errors import QvlError
from qvl_export.core.manifest import REPORT, Manifest
from qvl_export.parity.compare import compare, kl_divergence, token_agreement
from qvl_export.parity.samples import ALL_CASES, QUICK_CASES, VIDEO_FPS, VIDEO_PIXELS, Case

# (stage, metric) -> (gate key, kind): "min" means value >= threshold, "max" value <= threshold
CHECKS = (
    ("prompt", "ids_equal", None, "min"),
    ("prompt", "positions_equal", None, "min"),
    ("preprocess", "max_abs", "preprocess_max_abs", "max"),
    ("vision", "cosine", "vision_cosine", "min"),
    ("vision", "finite", None, "min"),
    ("merger", "cosine", "merger_cosine", "min"),
    ("merger", "finite", None, "min"),
    ("deepstack", "cosine", "merger_cosine", "min"),
    ("deepstack", "finite", None, "min"),
    ("video_preprocess", "max_abs", "preprocess_max_abs", "max"),
    ("video_merger", "cosine", "merger_cosine", "min"),
    ("video_merger", "finite", None, "min"),
    ("video_deepstack", "cosine", "merger_cosine", "min"),
    ("video_deepstack", "finite", None, "min"),
    ("prefill", "cosine", "logits_cosine", "min"),
    ("prefill", "top1_equal", "prefill_top1", "min"),
    ("prefill", "top1_decisive", "prefill_top1_decisive", "min"),
    ("prefill", "kl_outside_ties", "logits_kl", "max"),
    ("steps", "min_cosine", "logits_cosine", "min"),
    ("steps", "max_kl_outside_ties", "logits_kl", "max"),
    ("steps", "mean_kl_outside_ties", "logits_mean_kl", "max"),
    ("steps", "finite", None, "min"),
    ("steps", "top1_decisive", "logits_top1", "min"),
    ("greedy", "match_fraction", "greedy_match_fraction", "min"),
    ("greedy", "decisive_match", "greedy_decisive_match", "min"),
    ("task", "exact_match_drop", "task_exact_match_drop", "max"),
    ("eval", "answer_agreement", "task_answer_agreement", "min"),  # --eval-docs (parity/eval_docs.py)
    ("eval", "exact_match_drop", "task_exact_match_drop", "max"),
)


# A reference step is decisive when its top token's logit beats the runner-up's by this much (nats:
# the top token is >= e times as likely). Below it the two are a near-tie that any rounding may
# flip - typical of random-weight models, whose next-token distributions are almost flat - and
# the step's agreement is judged by the KL gate instead of by its argmax.
DECISIVE_MARGIN = 1.0
# A reference step is a two-way near-tie when it is not decisive and its top two tokens hold at least
# this much of the probability: a sharp model torn between two answers (a trained model on a page it was
# not trained for). There the KL measures only how far the two swapped places - 8-bit rounding moves
# such a margin by about half a nat (a trained form reader, int8: 0.42/0.31 became 0.71/0.13, KL 0.19,
# every one of its 250 held-out answers unchanged) - so, like the argmax, it is reported, not gated.
# A near-flat step (random weights, or a trained model far from its data) spreads its mass over many
# tokens, never counts as a tie, and keeps its KL gate.
TIE_MASS = 0.5


def top2_margin(logits: np.ndarray) -> float:
    """Logit of the top token minus the runner-up's."""
    top = np.partition(np.asarray(logits, dtype=np.float64).ravel(), -2)[-2:]
    return float(top[1] - top[0])


def near_tie(logits: np.ndarray) -> bool:
    """Not decisive, and the top two tokens hold at least ``TIE_MASS`` of the probability."""
    z = np.asarray(logits, dtype=np.float64).ravel()
    top = np.partition(z, -2)[-2:]
    if top[1] - top[0] >= DECISIVE_MARGIN:
        return False
    mass = np.exp(top - top[1]).sum() / np.exp(z - top[1]).sum()
    return bool(mass >= TIE_MASS)


LOSSINESS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")  # end-to-end stages take the lossiest part's gates


def _gates_file(gates_file: Path | None) -> dict:
    defaults = json.loads(resources.files("qvl_export.parity").joinpath("gates.json").read_text())
    if gates_file is None:
        return defaults
    try:
        user = json.loads(Path(gates_file).read_text())
    except (OSError, ValueError) as err:
        raise QvlError(f"Gates file {gates_file} is unreadable ({err}); it must be JSON.") from None
    if not isinstance(user, dict):
        raise QvlError(f"Gates file {gates_file} must hold an object of thresholds.")
    known = {k for prec in defaults.values() if isinstance(prec, dict) for k in prec}
    flat = {k: v for k, v in user.items() if not isinstance(v, dict)}
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in defaults.items()}
    for prec, override in list(user.items()) + ([("*", flat)] if flat else []):
        if not isinstance(override, dict):
            continue
        unknown = sorted(k for k in override if k not in known and not k.startswith("_"))
        if unknown:
            raise QvlError(f"Gates file {gates_file} has unknown keys {unknown}; known: {sorted(known)}.")
        targets = [p for p in merged if isinstance(merged[p], dict)] if prec == "*" else [prec]
        for t in targets:
            merged.setdefault(t, {}).update({k: float(v) for k, v in override.items() if k in known})
    return merged


def load_gates(precision: str | dict[str, str], gates_file: Path | None = None) -> dict[str, float]:
    """Thresholds for a build: per-part precisions pick the vision/merger gates, the lossiest part
    picks the end-to-end ones (prefill logits, steps, greedy)."""
    table = _gates_file(gates_file)
    precisions = precision if isinstance(precision, dict) else {"vision": precision, "merger": precision,
                                                                "decoder": precision}
    for prec in set(precisions.values()):
        if not isinstance(table.get(prec), dict):
            raise QvlError(f"No parity gates for precision {prec!r}; pass --gates FILE with them.")
    worst = max(precisions.values(), key=LOSSINESS.index)
    gates = dict(table[worst])
    gates["vision_cosine"] = table[precisions["vision"]]["vision_cosine"]
    gates["merger_cosine"] = min(table[precisions["merger"]]["merger_cosine"],
                                 table[precisions["vision"]]["merger_cosine"])
    return gates


@dataclass
class Report:
    precision: str
    gates: dict[str, float]
    cases: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c["passed"] for case in self.cases for c in case["checks"])

    def failures(self) -> list[str]:
        out = []
        for case in self.cases:
            named = False
            for c in case["checks"]:
                if c["passed"]:
                    continue
                line = (f"{case['name']}/{c['stage']}.{c['metric']}={c['value']:.6g} (needs "
                        f"{'>=' if c['kind'] == 'min' else '<='} {c['threshold']:.6g})")
                changed = case["stages"][c["stage"]].get("changed")
                if changed and not named:  # --eval-docs: the documents whose answer changed, by name, once
                    named = True
                    line += f" - answers changed on {', '.join(changed[:8])}" + (
                        f" and {len(changed) - 8} more" if len(changed) > 8 else "")
                out.append(line)
        return out

    def failure_summary(self) -> str:
        f = self.failures()
        f = [x for x in f if "answers changed on" in x] + [x for x in f if "answers changed on" not in x]
        return "; ".join(f[:4]) + (f" and {len(f) - 4} more" if len(f) > 4 else "")

    def to_json(self) -> str:
        return json.dumps({"passed": self.passed, "precision": self.precision, "gates": self.gates,
                           "meta": self.meta, "cases": self.cases}, indent=2)

    def table(self) -> str:
        rows = [f"{'case':<12} {'stage':<10} {'cosine':>10} {'max_abs':>10} {'other':<40} result"]
        for case in self.cases:
            failed = {(c["stage"]) for c in case["checks"] if not c["passed"]}
            for stage, m in case["stages"].items():
                cos = m.get("cosine", m.get("min_cosine"))
                other = ""
                if stage == "greedy":
                    other = (f"{m['matched_prefix']}/{m['ref_len']} tokens, diverge@{m['first_divergence']}, "
                             f"decisive lead {m.get('decisive_prefix', 0)}")
                elif stage == "prompt":
                    other = f"{m['tokens']} tokens, ids {'=' if m['ids_equal'] else '!='}"
                elif stage == "steps":
                    decisive = "n/a" if m["top1_decisive"] is None else f"{m['top1_decisive']:.2f}"
                    other = (f"top1 {decisive} of {m['decisive_steps']} decisive "
                             f"({m['top1_agreement']:.2f} of {m['steps']}), kl {m['max_kl']:.1e}"
                             + (f" mean {m['mean_kl_outside_ties']:.1e}" if m.get("mean_kl_outside_ties") is not None
                                else "")
                             + (f" ({m['tie_steps']} near-tie: kl {_kl(m.get('max_kl_outside_ties'))} outside)"
                                if m.get("tie_steps") else ""))
                elif stage == "prefill":
                    other = (f"top1 {'same' if m['top1_equal'] else 'DIFFERENT'}"
                             f"{'' if m.get('top1_decisive') is not None else ' (near-tie: n/a)'}, kl {m['kl']:.1e}"
                             + (" (two-way tie: not gated)" if "kl_outside_ties" in m and m["kl_outside_ties"] is None
                                else ""))
                elif stage == "eval":
                    other = f"{m['answer_agreement']:.3f} of {m['documents']} answers agree"
                    if "exact_match" in m:
                        other += f", exact {m['exact_match']:.3f} (ref {m['reference_exact_match']:.3f})"
                elif stage == "task":
                    other = f"exact {m['exact_match']:.3f} (fp32 {m['reference_exact_match']:.3f})"
                    if "answer_agreement" in m:
                        other += (f", {m['answer_agreement']:.3f} same answers"
                                  f" ({len(m['broke'])} broke, {len(m['fixed'])} fixed)")
                cos_s = "" if cos is None else f"{cos:.7f}"
                abs_s = "" if "max_abs" not in m else f"{m['max_abs']:.2e}"
                result = "FAIL" if stage in failed else "ok"
                rows.append(f"{case['name']:<12} {stage:<10} {cos_s:>10} {abs_s:>10} {other:<40} {result}")
            for doc in [d for d in case.get("documents", []) if not d["agree"]][:10]:
                rows.append(f"{'':<12} changed    {doc['document']}: reference {doc['reference']!r}, ours {doc['ours']!r}")
        rows.append(f"gate ({self.precision}): {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(rows)


def _kl(value) -> str:
    return "n/a" if value is None else f"{value:.1e}"


def _check(stages: dict, gates: dict[str, float]) -> list[dict]:
    out = []
    for stage, metric, key, kind in CHECKS:
        if stage not in stages or stages[stage].get(metric) is None:  # absent or n/a: not gated
            continue
        value = float(stages[stage][metric])
        threshold = 1.0 if key is None else gates[key]
        ok = value >= threshold if kind == "min" else value <= threshold
        out.append({"stage": stage, "metric": metric, "value": value, "threshold": threshold, "kind": kind,
                    "passed": bool(ok)})
    return out


def reference_case(ref, case: Case, max_new_tokens: int):
    """Run one case on the PyTorch reference; keeps what the comparison reads (the prefill's last
    row of logits, not all [T, V] of them). Returns (result, seconds)."""
    from qvl_export.parity.reference import ReferenceCase

    t0 = time.perf_counter()
    r = ref.run(ReferenceCase(case.name, case.images(), case.prompt, max_new_tokens=max_new_tokens,
                              system=case.system, videos=case.videos(), fps=VIDEO_FPS,
                              video_min_pixels=VIDEO_PIXELS["video_min_pixels"],
                              video_max_pixels=VIDEO_PIXELS["video_max_pixels"]))
    r.prefill_logits = np.array(r.prefill_logits[-1:], copy=True)
    return r, time.perf_counter() - t0


def compare_case(pipe, r, case: Case, max_new_tokens: int, t_ref: float = 0.0) -> dict:
    """Run one case on the artifacts against the reference's result ``r``; its stages' metrics (no gating)."""
    images = case.images()
    t1 = time.perf_counter()
    videos = case.videos()
    prep = pipe.prepare(images, case.prompt, system=case.system, videos=videos, fps=VIDEO_FPS,
                        **(VIDEO_PIXELS if videos else {}))
    stages: dict[str, dict] = {}
    ids_equal = prep.input_ids.shape == r.input_ids.shape and bool((prep.input_ids == r.input_ids).all())
    pos_equal = prep.position_ids.shape == r.position_ids.shape and bool((prep.position_ids == r.position_ids).all())
    stages["prompt"] = {"tokens": int(len(prep.input_ids)), "ids_equal": float(ids_equal),
                        "positions_equal": float(pos_equal), "rope_delta": prep.rope_delta,
                        "ref_rope_delta": int(r.rope_delta)}
    if images:
        kept = [i for i, k in enumerate(prep.kinds) if k == "image"]
        patches, grids = [prep.patches[i] for i in kept], [prep.grids[i] for i in kept]
        stages["preprocess"] = compare(np.concatenate(patches), r.pixel_values)
        vis = pipe.encode_images(patches, grids)
        ours_hidden = vis.vision_hidden[vis.layout.window_order_rows()]
        stages["vision"] = compare(ours_hidden, r.vision_hidden)
        stages["merger"] = compare(vis.image_embeds, r.merger_out)
        if vis.deepstack_embeds is not None or r.deepstack_out is not None:  # Qwen3-VL: [L, N, D] both
            stages["deepstack"] = _compare_deepstack(vis.deepstack_embeds, r.deepstack_out)
    if videos:  # temporal patches: per-frame-group attention, rotary and windows
        kept = [i for i, k in enumerate(prep.kinds) if k == "video"]
        patches, grids = [prep.patches[i] for i in kept], [prep.grids[i] for i in kept]
        stages["video_preprocess"] = compare(np.concatenate(patches), r.pixel_values_videos)
        vis = pipe.encode_images(patches, grids)
        stages["video_merger"] = compare(vis.image_embeds, r.video_merger_out)
        if vis.deepstack_embeds is not None or r.video_deepstack_out is not None:
            stages["video_deepstack"] = _compare_deepstack(vis.deepstack_embeds, r.video_deepstack_out)
    # greedy on the raw logits, as the reference (the checkpoint's sampling settings are not gated)
    gen = pipe.generate(prepared=prep, max_new_tokens=max_new_tokens, keep_logits=True, temperature=0.0,
                        repetition_penalty=1.0)
    t_ours = time.perf_counter() - t1

    ours_first = gen.step_logits[0]
    stages["prefill"] = compare(ours_first[None], r.prefill_logits[-1][None])
    stages["prefill"]["top1_equal"] = float(int(np.argmax(ours_first)) == int(np.argmax(r.prefill_logits[-1])))
    stages["prefill"]["kl"] = kl_divergence(ours_first, r.prefill_logits[-1])
    stages["prefill"]["kl_outside_ties"] = None if near_tie(r.prefill_logits[-1]) else stages["prefill"]["kl"]
    # the prefill's argmax is gated where the reference is decisive about it; a near-tie is n/a (the KL judges it)
    decisive_prefill = top2_margin(r.prefill_logits[-1]) >= DECISIVE_MARGIN
    stages["prefill"]["top1_decisive"] = stages["prefill"]["top1_equal"] if decisive_prefill else None
    agree = token_agreement(gen.token_ids, [int(t) for t in r.generated_ids])
    # teacher-forced: our decoder fed the reference's own tokens, so every reference step is compared
    # even after a greedy divergence (a near-tie flip ends the greedy comparison, not this one)
    forced = forced_logits(pipe, prep, [int(t) for t in r.generated_ids])
    n = min(len(forced), len(r.step_logits))
    cos = [compare(forced[i][None], r.step_logits[i][None])["cosine"] for i in range(n)]
    top1 = [int(np.argmax(forced[i])) == int(np.argmax(r.step_logits[i])) for i in range(n)]
    decisive = [i for i in range(n) if top2_margin(r.step_logits[i]) >= DECISIVE_MARGIN]
    max_abs = max(float(np.abs(forced[i] - r.step_logits[i]).max()) for i in range(n))
    kl = [kl_divergence(forced[i], r.step_logits[i]) for i in range(n)]
    gated_kl = [kl[i] for i in range(n) if not near_tie(r.step_logits[i])]
    stages["steps"] = {"steps": n, "min_cosine": float(min(cos)), "mean_cosine": float(np.mean(cos)),
                       "max_kl": float(max(kl)), "mean_kl": float(np.mean(kl)),
                       # the KL gate's: every step but the reference's two-way near-ties (None: all are)
                       "max_kl_outside_ties": float(max(gated_kl)) if gated_kl else None,
                       # a drift every step shares (a broken scale, a lossy part) rather than one sharp step
                       "mean_kl_outside_ties": float(np.mean(gated_kl)) if gated_kl else None,
                       "tie_steps": n - len(gated_kl),
                       "max_abs": max_abs, "top1_agreement": float(np.mean(top1)),
                       "decisive_steps": len(decisive),
                       # None ("n/a"): no reference step is decisive (random weights), nothing to gate here -
                       # the step KL and cosine gates judge those steps
                       "top1_decisive": float(np.mean([top1[i] for i in decisive])) if decisive else None,
                       "finite": float(all(np.isfinite(f).all() for f in forced))}
    # greedy over the reference's leading decisive steps: up to its first near-tie every token is one the
    # reference was sure of, so ours must be the same; after it a legitimate flip may end the comparison
    sure = set(decisive)
    lead = next((i for i in range(n) if i not in sure), n)
    agree["decisive_prefix"] = lead
    agree["decisive_match"] = min(agree["matched_prefix"], lead) / lead if lead else None
    stages["greedy"] = agree
    return {"name": case.name, "images": [list(s) for s in case.sizes], "prompt": case.prompt,
            "stages": stages, "seconds": {"reference": t_ref, "artifacts": t_ours},
            "text": {"ours": gen.text}}


def _compare_deepstack(ours: np.ndarray | None, ref: np.ndarray | None) -> dict:
    """DeepStack features [L, N, D] against the reference's; one side without them fails the stage."""
    if ours is None or ref is None or ours.shape != ref.shape:
        shapes = [None if x is None else list(x.shape) for x in (ours, ref)]
        return {"cosine": 0.0, "finite": 0.0, "shapes": shapes}
    return compare(ours, ref)


def task_case(pipe, reference: dict, pages: int) -> dict:
    """A trained checkpoint's task as a gate case (``demo-task`` for the demo's invoices, ``form-task``
    for the form reader): the artifacts' exact match on the task's held-out pages vs the fp32
    reference's (``eval.json``, whose ``"task"`` names the task)."""
    from qvl_export.demo.accuracy import agreement, exact_match, pipeline_reader

    task = task_for(reference["task"])
    ours = exact_match(pipeline_reader(pipe, task.max_new_tokens), pages, int(reference["heldout_seed_offset"]),
                       task=task)
    ref = float(reference["exact_match"])
    stage = {"pages": pages, "exact_match": ours["exact_match"], "reference_exact_match": ref,
             "reference_pages": int(reference["heldout"]), "exact_match_drop": ref - ours["exact_match"],
             "examples_wrong": ours["examples_wrong"][:5]}
    # page by page against transformers' own answers (when eval.json records them): reported, not gated
    stage.update(agreement(ours, reference, pages) or {})
    return {"name": task.case, "images": [], "prompt": "", "stages": {"task": stage},
            "seconds": {"reference": 0.0, "artifacts": ours["seconds"]}, "text": {}}


def forced_logits(pipe, prep, tokens: list[int]) -> list[np.ndarray]:
    """Logits [V] of the prefill and of every step fed ``tokens`` (teacher forcing), in order."""
    from qvl_export.runtimes import indexing

    hidden = pipe.spec.text.hidden_size
    if prep.patches:
        vis = pipe.encode_images(prep.patches, prep.grids)
        embeds, deepstack = vis.image_embeds, vis.deepstack_embeds
    else:
        embeds, deepstack = np.zeros((0, hidden), np.float32), None
    cache = pipe.new_cache(capacity=len(prep.input_ids) + len(tokens))
    prompt_ids = prep.input_ids if prep.decoder_ids is None else prep.decoder_ids  # video pads fed as image pads
    out = [pipe.decoder_step(prompt_ids[None], embeds, prep.position_ids[:, None, :], cache, deepstack)[0]]
    no_image = np.zeros((0, hidden), np.float32)
    for token in tokens[:-1]:
        pos = indexing.decode_positions(cache.length, prep.rope_delta, 1)
        out.append(pipe.decoder_step(np.asarray([[token]], np.int64), no_image, pos[:, None, :], cache)[0])
    return out


def outside_ranges(manifest: Manifest, case: Case) -> str | None:
    """Why ``case`` lies outside the shape ranges a trt build's engines were built for (the runtime
    would refuse it), or None. Each image and each temporal patch of a video counts as one image."""
    if manifest.tensorrt is None:
        return None
    limit = int(manifest.tensorrt.ranges.get("max_images", 1))
    groups = len(case.sizes) + ((case.video[0] + 1) // 2 if case.video else 0)
    if groups > limit:
        return f"{groups} images / video frame groups, the engines take {limit} (--max-images at build time)"
    return None


def no_video_support(artifacts: Path) -> str | None:
    """Why the artifacts' chat template cannot take a video item, or None (``chat.video_support``)."""
    from qvl_export.runtimes.chat import ChatTemplate, video_support

    return video_support(ChatTemplate.from_artifacts(artifacts))


def check_reference(manifest: Manifest, reference_dir: Path) -> None:
    """Refuse, in one line, a reference that is not the checkpoint the artifacts were built from."""
    from qvl_export.loading.config import parse_model_config
    from qvl_export.loading.weights import CheckpointWeights

    built = manifest.source.architecture
    try:
        found = parse_model_config(reference_dir, assume_default_preprocessing=True).architecture
    except QvlError as err:
        raise QvlError(f"{reference_dir} cannot be the reference: {err}") from None
    if built and found != built:
        raise QvlError(f"{reference_dir} is a {found} checkpoint but the artifacts were built from a {built}: pass the "
                       f"checkpoint they were built from ({manifest.source.path}).")
    want = manifest.source.sha256
    if want and CheckpointWeights(reference_dir).fingerprint() != want:
        raise QvlError(f"{reference_dir} is not the checkpoint the artifacts were built from (its config and weights "
                       f"hash differently); pass {manifest.source.path}, or rebuild from this one.")


def run_parity(artifacts: str | Path, reference_dir: str | Path, gates_file: Path | None = None,
               quick: bool = False, max_new_tokens: int = 64, cases: list[Case] | None = None,
               progress: Callable[[str], None] | None = None, threads: int | None = None,
               task_pages: int | None = None, verify: bool = True, eval_docs=None,
               reference_cache: dict | None = None, reference_weights: str = "stored") -> Report:
    """Gate ``artifacts`` against the checkpoint in ``reference_dir``. When that is a model trained on
    one of our tasks (the built-in demo, the form reader: ``qvl_export.demo.tasks``), the artifacts'
    exact match on its task's held-out pages is gated too, against the fp32 figure of its
    ``eval.json`` (``task_pages``: fewer pages, default all of them; 0: skip).
    ``eval_docs`` (a folder, or ``eval_docs.read_eval_docs``' list): the task gate on those documents,
    answers of the artifacts vs the reference's (``parity/eval_docs.py``). ``reference_cache``: a dict
    kept by the caller across calls on the same checkpoint - reference results are taken from it and
    added to it, so gating several builds of one checkpoint runs transformers once per case.
    ``reference_weights``: "stored" (a bf16 / fp16 checkpoint's weights held as stored, widened per module
    while it runs) or "float32" (widened at load: faster, twice the memory); the same numbers."""
    from qvl_export.parity import eval_docs as task_docs
    from qvl_export.parity.reference import TorchReference
    from qvl_export.runtimes.pipeline import Pipeline

    artifacts = Path(artifacts)
    manifest = Manifest.read(artifacts)
    gates = load_gates(manifest.precisions, gates_file)
    reference_dir = Path(reference_dir)
    if not (reference_dir / "config.json").exists():
        raise QvlError(f"{reference_dir} is not a checkpoint folder (no config.json); pass the model the "
                       "artifacts were built from.")
    say = progress or (lambda m: None)
    check_reference(manifest, reference_dir)
    if eval_docs is not None and not isinstance(eval_docs, list):
        eval_docs = task_docs.read_eval_docs(eval_docs)  # bad input fails before anything runs
    if verify:
        manifest.verify(artifacts)  # a damaged folder fails before the reference runs
    # the reference and the artifacts are never resident together: every case runs on the reference
    # first (its results kept, small), the reference is freed, then the artifacts load
    chosen, skipped = [], {}
    for case in cases or (QUICK_CASES if quick else ALL_CASES):
        why = outside_ranges(manifest, case) or (case.video and no_video_support(artifacts))
        if why:
            skipped[case.name] = why
            say(f"parity case {case.name} skipped: {why}")
        else:
            chosen.append(case)
    cache = {} if reference_cache is None else reference_cache
    key = (str(reference_dir.resolve()), max_new_tokens)
    eval_key = (key, "eval", tuple((d.name, d.prompt) for d in eval_docs or []))
    missing = [c for c in chosen if (key, c.name) not in cache]
    held = None  # the dtype the reference held its weights in (None: every result came from the cache)
    if missing or (eval_docs and eval_key not in cache):
        gc.collect()  # what the caller let go (a build's graphs are reference cycles) before the reference loads
        say("loading the PyTorch reference (transformers)")
        ref = TorchReference(reference_dir, stored_weights=reference_weights == "stored")
        held = ref.resident_dtype or ref.dtype
        for case in missing:
            say(f"reference case {case.name}")
            cache[(key, case.name)] = reference_case(ref, case, max_new_tokens)
        if eval_docs and eval_key not in cache:
            cache[eval_key] = task_docs.reference_answers(ref, eval_docs, say)
        del ref
    references = [cache[(key, c.name)] for c in chosen]
    eval_ids = cache.get(eval_key) if eval_docs else None
    gc.collect()
    pipe = Pipeline.load(artifacts, threads=threads, verify=False)
    report = Report(precision=manifest.precision, gates=gates,
                    meta={"artifacts": str(artifacts), "reference": str(reference_dir),
                          "max_new_tokens": max_new_tokens, "quick": quick,
                          "source_sha256": manifest.source.sha256, "skipped_cases": skipped,
                          "eval_docs": len(eval_docs or []), "reference_weights_held_as": held})
    for case, (r, t_ref) in zip(chosen, references):
        say(f"parity case {case.name}")
        result = compare_case(pipe, r, case, max_new_tokens, t_ref)
        result["checks"] = _check(result["stages"], gates)
        result["passed"] = all(c["passed"] for c in result["checks"])
        report.cases.append(result)
    task = task_reference(reference_dir)
    if task is not None and task_pages != 0:
        pages = min(int(task["heldout"]), task_pages or int(task["heldout"]))
        which = task_for(task["task"])
        say(f"{which.case.replace('-', ' ')}: exact match on {pages} held-out {which.noun}")
        result = task_case(pipe, task, pages)
        result["checks"] = _check(result["stages"], gates)
        result["passed"] = all(c["passed"] for c in result["checks"])
        report.cases.append(result)
    if eval_docs:
        say(f"eval documents: the artifacts' answers on {len(eval_docs)} documents")
        result = task_docs.eval_case(pipe, eval_docs, eval_ids, say)
        result["checks"] = _check(result["stages"], gates)
        result["passed"] = all(c["passed"] for c in result["checks"])
        report.cases.append(result)
    tmp = artifacts / f".{REPORT}.tmp"
    tmp.write_text(report.to_json())
    tmp.replace(artifacts / REPORT)
    return report
