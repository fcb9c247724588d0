"""Turn the workers' results into the benchmark report: ``bench.json``, a text table and a plot.

Derived figures and their rules:

- speedups are ORT over PyTorch: tokens/s ratio for decode, time ratio (torch / ort) for prefill
  and the vision encoder; the vision figure of ORT is graph time (vision + merger runs), host work
  (window layout, rotary tables, gathers) is reported beside it as ``host_ms``;
- scaling: for every pair of measured pages whose pixel count grows 4x (side x2), time(big) /
  time(small) per engine (5.0 at most is the goal for the fused windows);
- decode roofline: memory bandwidth / weight bytes streamed per decode token. Bandwidth is the
  streaming copy figure ((read + write bytes) / time, best of 5, ``bandwidth_mib`` arrays, all
  threads); the read-only figure (streaming dot product) gives a second, stricter roofline.
  Weight bytes follow ``ort_engine.decoder_weight_bytes``: every decoder initializer in full,
  except a table consumed only by Gather (an untied embedding: one row per token). The KV cache
  read per step is reported beside it, not added in.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from qvl_export.bench.runs import CONTENTION
from qvl_export.core import precisions

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    from qvl_export.bench.runs import WorkerRun

ENGINES = {"torch": "torch-vision", "ort_fused": "ort-vision-fused", "ort_dense": "ort-vision-dense"}
VARIANT = {"torch": None, "ort_fused": "fused", "ort_dense": "dense"}
LABELS = {"torch": "PyTorch eager (sdpa)", "ort_fused": "ORT fused windows", "ort_dense": "ORT dense mask"}
GOAL_SPEEDUP = 1.5
GOAL_SCALING = 5.0
GOAL_INT8_DECODE = 2.0  # int8 decode tokens/s over our fp32 decode
GOAL_INT8_BYTES = 0.3  # int8 artifact bytes over our fp32 artifact bytes


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def _skip_reason(meta: dict, runs: dict, engine: str, worker: str, variant: str | None = None) -> str:
    """Why ``worker`` gave no figure for ``engine`` (``variant``: the artifacts an ORT worker needs)."""
    if variant == "dense" and "dense" not in meta["variants"]:
        return "Qwen2-VL has no window attention: every vision block is full attention, fused == dense"
    if engine == "torch" and meta["skip_torch"]:
        return "PyTorch skipped (--skip-torch)"
    if "checkpoint" in runs and not runs["checkpoint"].ok:
        return f"checkpoint failed: {runs['checkpoint'].error}"
    export = runs.get(f"export-{variant}") if variant else None
    if export is not None and not export.ok:
        return f"export ({variant}) failed: {export.error}"
    run = runs.get(worker)
    if run is None:
        return "not run"
    return run.error or "not measured"


def _vision(meta: dict, runs: dict) -> dict:
    out = {}
    for px in meta["pixels"]:
        row: dict = {"px": px, "pixels": px * px}
        for engine, worker in ENGINES.items():
            page = (runs[worker].result.get("pages") or {}).get(str(px)) if worker in runs else None
            if page is None:
                row[engine] = {"skipped": _skip_reason(meta, runs, engine.split("_")[0], worker, VARIANT[engine])}
                continue
            fig = {"ms": page["ms"], "min_ms": min(page["samples_ms"]), "samples_ms": page["samples_ms"],
                   "peak_rss_mb": page["peak_rss_mb"]}
            for key in ("host_ms", "total_ms", "preprocess_ms", "padded_tokens"):
                if key in page:
                    fig[key] = page[key]
            row[engine] = fig
            row.setdefault("tokens", page["tokens"])
            row.setdefault("grid", page["grid"])
        out[str(px)] = row
    return out


def _vision_video(meta: dict, runs: dict) -> dict | None:
    """The clip's figure per engine: vision ms (ORT: graph time, host beside) and visual tokens."""
    if not meta.get("video"):
        return None
    frames, px = meta["video"]
    out: dict = {"frames": frames, "px": px}
    for engine, worker in ENGINES.items():
        fig = (runs[worker].result.get("video") if worker in runs else None)
        if fig is None:
            out[engine] = {"skipped": _skip_reason(meta, runs, engine.split("_")[0], worker, VARIANT[engine])}
            continue
        out[engine] = {k: fig[k] for k in ("ms", "samples_ms", "peak_rss_mb", "host_ms", "total_ms",
                                           "preprocess_ms", "padded_tokens") if k in fig}
        out[engine]["min_ms"] = min(fig["samples_ms"])
        for key in ("grid", "patches", "tokens"):
            out.setdefault(key, fig[key])
    out["speedup"] = _ratio(out["torch"].get("ms"), out["ort_fused"].get("ms"))
    return out


def _llm(meta: dict, runs: dict) -> tuple[dict, dict, dict]:
    prefill, decode, info = {}, {}, {}
    for engine, worker in (("torch", "torch-llm"), ("ort", "ort-llm")):
        run = runs.get(worker)
        figs = run.result.get("llm") if run is not None else None
        if not figs:
            reason = _skip_reason(meta, runs, engine, worker, None if engine == "torch" else "fused")
            prefill[engine] = decode[engine] = {"skipped": reason}
            continue
        prefill[engine] = {"ms": figs["prefill_ms"], "min_ms": min(figs["prefill_samples_ms"]),
                           "samples_ms": figs["prefill_samples_ms"], "peak_rss_mb": run.result["peak_rss_mb"]}
        decode[engine] = {"tokens_per_s": figs["decode_tokens_per_s"],
                          "ms_per_token": figs["decode_ms_per_token"],
                          "samples_tokens_per_s": figs["decode_samples_tokens_per_s"],
                          "peak_rss_mb": run.result["peak_rss_mb"]}
        if "prefill_graph_ms" in figs:
            prefill[engine]["graph_ms"] = figs["prefill_graph_ms"]
            decode[engine]["graph_ms_per_token"] = figs["decode_graph_ms_per_token"]
        info = {"prompt_tokens_total": run.result["prompt_tokens_total"], "image_tokens": run.result["image_tokens"]}
    return prefill, decode, info


def _peaks(runs: dict) -> dict:
    out = {}
    for name, run in runs.items():
        if name.startswith(("torch-", "ort-vision", "ort-llm")) and "peak_rss_mb" in run.result:
            out[name] = {"peak_rss_mb": run.result["peak_rss_mb"],
                         "rss_after_load_mb": run.result.get("rss_after_load_mb"),
                         "load_s": run.result.get("load_s")}
    return out


def _scaling(vision: dict) -> dict:
    out = {}
    sides = sorted(int(k) for k in vision)
    for a in sides:
        if 2 * a not in sides:
            continue
        pair = {"pixel_ratio": 4.0}
        for engine in ENGINES:
            small, big = vision[str(a)].get(engine, {}), vision[str(2 * a)].get(engine, {})
            pair[engine] = _ratio(big.get("ms"), small.get("ms"))
        out[f"{a}->{2 * a}"] = pair
    return out


def _quantized(meta: dict, runs: dict, vision: dict, prefill: dict, decode: dict, export: dict) -> dict:
    """Each quantized build against our fp32 build (same checkpoint, passes and threads)."""
    out = {}
    base_bytes = export.get("fused", {}).get("bytes")
    for q in meta.get("quantized", []):
        fig: dict = {"export": export.get(q)}
        run = runs.get(f"export-{q}")
        if run is not None and run.ok:
            fig["part_bytes"] = run.result.get("part_bytes")
            fig["quantization"] = run.result.get("quantization")
        fig["bytes_ratio"] = _ratio(export.get(q, {}).get("bytes"), base_bytes)
        llm = runs.get(f"ort-llm-{q}")
        figs = llm.result.get("llm") if llm is not None else None
        if figs:
            fig["prefill_ms"] = figs["prefill_ms"]
            fig["decode_tokens_per_s"] = figs["decode_tokens_per_s"]
            fig["decode_samples_tokens_per_s"] = figs["decode_samples_tokens_per_s"]
            fig["llm_peak_rss_mb"] = llm.result["peak_rss_mb"]
            fig["decode_speedup"] = _ratio(figs["decode_tokens_per_s"], decode.get("ort", {}).get("tokens_per_s"))
            fig["prefill_speedup"] = _ratio(prefill.get("ort", {}).get("ms"), figs["prefill_ms"])
        else:
            fig["llm_skipped"] = _skip_reason(meta, runs, "ort", f"ort-llm-{q}", q)
        pages = ((runs.get(f"ort-vision-{q}") or _NoRun).result.get("pages") or {})
        fig["vision"] = {}
        for px, row in vision.items():
            page = pages.get(px)
            if page is None:
                continue
            fig["vision"][px] = {"ms": page["ms"], "samples_ms": page["samples_ms"], "peak_rss_mb": page["peak_rss_mb"],
                                 "speedup_vs_fp32": _ratio(row["ort_fused"].get("ms"), page["ms"]),
                                 "speedup_vs_torch": _ratio(row["torch"].get("ms"), page["ms"])}
        out[q] = fig
    return out


class _NoRun:
    result: dict = {}


def _roofline(bandwidth: dict, weights: dict | None, decode: dict, meta: dict, spec_text: dict,
              llm_info: dict) -> dict:
    if not weights or not bandwidth.get("copy_gb_s"):
        return {"skipped": "needs the bandwidth figure and a built decoder"}
    per_token = weights["bytes_per_token"]
    copy_tps = bandwidth["copy_gb_s"] * 1e9 / per_token
    read_tps = bandwidth["read_gb_s"] * 1e9 / per_token
    t = spec_text
    mean_ctx = llm_info.get("prompt_tokens_total", 0) + meta["decode_tokens"] / 2
    kv = 2 * t["layers"] * t["kv_heads"] * (t["hidden"] // t["heads"]) * 4 * mean_ctx
    out = {
        "rule": "weight bytes per decode token = all decoder initializers, except a table read only by "
                "Gather (untied embedding: one row per token); tied embeddings count once, in full, as "
                "the lm_head",
        "weight_bytes_per_token": per_token,
        "gather_only_bytes_excluded": weights["gather_only_bytes"],
        "largest_weights": weights["largest"],
        "kv_cache_bytes_per_token_mean": kv,
        "bandwidth_gb_s": bandwidth["copy_gb_s"],
        "read_bandwidth_gb_s": bandwidth["read_gb_s"],
        "tokens_per_s": copy_tps,
        "read_tokens_per_s": read_tps,
        "fraction": {}, "fraction_of_read_roofline": {},
    }
    for engine, fig in decode.items():
        if "tokens_per_s" in fig:
            out["fraction"][engine] = fig["tokens_per_s"] / copy_tps
            out["fraction_of_read_roofline"][engine] = fig["tokens_per_s"] / read_tps
    return out


def assemble(meta: dict, runs: dict[str, "WorkerRun"], weights: dict | None) -> dict:
    vision = _vision(meta, runs)
    video = _vision_video(meta, runs)
    prefill, decode, llm_info = _llm(meta, runs)
    bandwidth = {k: v for k, v in runs["bandwidth"].result.items() if k not in ("done", "peak_rss_mb")} \
        if "bandwidth" in runs else {}
    export = {}
    for variant in meta["variants"]:
        run = runs.get(f"export-{variant}")
        if run is None or not run.ok:
            export[variant] = {"skipped": _skip_reason(meta, runs, "ort", f"export-{variant}")
                               if run is None else run.error}
        else:
            export[variant] = {"seconds": run.result["seconds"], "peak_rss_mb": run.result["peak_rss_mb"],
                               "bytes": run.result["bytes"], "cached": run.cached}
    checkpoint = runs.get("checkpoint")
    check = {"seconds": checkpoint.result.get("seconds"), "bytes": checkpoint.result.get("bytes"),
             "cached": checkpoint.cached} if checkpoint is not None and checkpoint.ok else \
        {"skipped": checkpoint.error if checkpoint else "not run"}

    scaling = _scaling(vision)
    ref_px = "896" if "896" in vision else str(meta["prefill_pixels"])
    speedups = {
        "decode": _ratio(decode.get("ort", {}).get("tokens_per_s"), decode.get("torch", {}).get("tokens_per_s")),
        "prefill": _ratio(prefill.get("torch", {}).get("ms"), prefill.get("ort", {}).get("ms")),
        "vision": {px: _ratio(row["torch"].get("ms"), row["ort_fused"].get("ms")) for px, row in vision.items()},
        "vision_dense": {px: _ratio(row["torch"].get("ms"), row["ort_dense"].get("ms"))
                         for px, row in vision.items()},
    }
    speedups["vision_ref"] = speedups["vision"].get(ref_px)
    speedups["vision_video"] = video["speedup"] if video else None
    real = meta["model"] != "tiny"
    applies = real and meta["threads"] == 2
    note = None if applies else "goals are defined on the real widths at 2 threads; shown for information"
    pair = "448->896" if "448->896" in scaling else next(iter(scaling), None)
    acceptance = {
        "decode_speedup": {"value": speedups["decode"], "goal": f">= {GOAL_SPEEDUP}",
                           "met": None if speedups["decode"] is None else speedups["decode"] >= GOAL_SPEEDUP},
        f"vision_speedup_{ref_px}": {"value": speedups["vision_ref"], "goal": f">= {GOAL_SPEEDUP}",
                                     "met": None if speedups["vision_ref"] is None
                                     else speedups["vision_ref"] >= GOAL_SPEEDUP},
    }
    if "dense" in meta["variants"] and pair:
        fused = scaling[pair]["ort_fused"]
        acceptance[f"fused_scaling_{pair}"] = {
            "value": fused, "goal": f"<= {GOAL_SCALING} (4x the pixels)",
            "met": None if fused is None else fused <= GOAL_SCALING,
            "dense_baseline": scaling[pair]["ort_dense"], "torch": scaling[pair]["torch"]}
    quantized = _quantized(meta, runs, vision, prefill, decode, export)
    if "int8" in quantized:
        q = quantized["int8"]
        acceptance["int8_decode_vs_fp32"] = {
            "value": q.get("decode_speedup"), "goal": f">= {GOAL_INT8_DECODE}",
            "met": None if q.get("decode_speedup") is None else q["decode_speedup"] >= GOAL_INT8_DECODE}
        acceptance["int8_bytes_vs_fp32"] = {
            "value": q.get("bytes_ratio"), "goal": f"<= {GOAL_INT8_BYTES}",
            "met": None if q.get("bytes_ratio") is None else q["bytes_ratio"] <= GOAL_INT8_BYTES}
    acceptance = {"applies": applies, "note": note, **acceptance}

    profile = None
    if "ort-profile" in runs and runs["ort-profile"].ok:
        profile = {k: v for k, v in runs["ort-profile"].result.items() if k not in ("done", "peak_rss_mb")}
        for section in profile.values():
            if isinstance(section, dict) and "ops" in section:
                section["ops"] = section["ops"][:12]

    warnings = []
    for name, run in runs.items():
        if run.other_cpu_cores > CONTENTION:
            warnings.append(f"{name}: other processes used {run.other_cpu_cores:.2f} CPU cores on average while it "
                            "ran; its timings are pessimistic")
        if not run.ok:
            warnings.append(f"{name}: {run.error.splitlines()[0]}")

    peer_figures = {}
    if meta.get("peers"):
        from qvl_export.bench import peers

        peer_figures = peers.report(tuple(meta["peers"]), runs, meta.get("peers_skipped", {}))

    return {
        **meta,
        "peer_results": peer_figures,
        "checkpoint": check,
        "export": export,
        "vision": vision,
        "vision_video": video,
        "prefill": {**llm_info, "page_px": meta["prefill_pixels"], **prefill},
        "decode": {"tokens": meta["decode_tokens"], **decode},
        "peak_rss": _peaks(runs),
        "bandwidth": bandwidth,
        "roofline": _roofline(bandwidth, weights, decode, meta, meta["config"]["text"], llm_info),
        "speedups": speedups,
        "scaling": scaling,
        "quantized": quantized,
        "acceptance": acceptance,
        "ort_profile": profile,
        "workers": {name: run.summary() for name, run in runs.items()},
        "warnings": warnings,
    }


# ----------------------------------------------------------------------------- output


def _f(x, fmt="{:.1f}", none="-"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return fmt.format(x)


def _rows(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def table(r: dict) -> str:
    """A plain-text summary of the report (what ``qvl-export bench`` prints)."""
    cfg = r["config"]
    depth = f"{cfg['vision']['depth']} vision / {cfg['text']['layers']} LLM layers"
    out = [f"{r['model']} ({depth}{'' if r['layers'] is None else ', cut with --layers'}), "
           f"{r['threads']} threads, fp32, median of {r['repeats']}"]
    machine = r.get("machine") or {}
    if machine.get("cpu"):
        out.append(f"machine: {machine['cpu']}, {machine.get('logical_cpus')} logical CPUs"
                   + (f", {' '.join(machine['isa'])}" if machine.get("isa") else ""))
    out.append("")
    out.append("Vision encoder (ViT + merger), ms; ORT = graph time, host prep beside")
    rows = []
    for px, row in r["vision"].items():
        cells = [f"{px}x{px}", str(row.get("tokens", "-"))]
        for engine in ENGINES:
            fig = row[engine]
            cells.append(_f(fig.get("ms")) if "ms" in fig else "skip")
        cells.append(_f(row["ort_fused"].get("host_ms")))
        cells.append(_f(r["speedups"]["vision"].get(px), "{:.2f}x"))
        cells += [_f(row[e].get("peak_rss_mb"), "{:.0f}") for e in ENGINES]
        rows.append(cells)
    out += _rows(["page", "tokens", "torch", "ort fused", "ort dense", "host", "speedup",
                  "rss torch", "rss fused", "rss dense"], rows)
    for pair, s in r["scaling"].items():
        out.append(f"scaling {pair} (4x pixels): fused {_f(s['ort_fused'], '{:.2f}x')}, "
                   f"dense {_f(s['ort_dense'], '{:.2f}x')}, torch {_f(s['torch'], '{:.2f}x')}")
    v = r.get("vision_video")
    if v:
        grid = "x".join(str(g) for g in v["grid"]) if "grid" in v else "-"
        figs = ", ".join(f"{e} {_f(v[e]['ms'])} ms" if "ms" in v[e] else f"{e} skip" for e in ENGINES)
        out.append(f"video clip {v['frames']} frames {v['px']}x{v['px']} (grid {grid}, {v.get('patches', '-')} "
                   f"patches, {v.get('tokens', '-')} visual tokens): {figs}, host {_f(v['ort_fused'].get('host_ms'))}"
                   f" ms, speedup {_f(v['speedup'], '{:.2f}x')}")
    out.append("")
    p, d = r["prefill"], r["decode"]
    out.append(f"LLM: prefill of one {p['page_px']}x{p['page_px']} page + {r['prompt_tokens']} text tokens "
               f"(T={p.get('prompt_tokens_total', '-')}), decode of {d['tokens']} tokens")
    rows = []
    for engine in ("torch", "ort"):
        pf, dc = p.get(engine, {}), d.get(engine, {})
        rows.append([engine, _f(pf.get("ms")), _f(dc.get("tokens_per_s"), "{:.2f}"),
                     _f(dc.get("ms_per_token")), _f(dc.get("peak_rss_mb"), "{:.0f}"),
                     _f(r["roofline"].get("fraction", {}).get(engine), "{:.0%}")])
    out += _rows(["engine", "prefill ms", "decode tok/s", "ms/token", "peak rss MiB", "of roofline"], rows)
    out.append(f"speedup ort/torch: decode {_f(r['speedups']['decode'], '{:.2f}x')}, "
               f"prefill {_f(r['speedups']['prefill'], '{:.2f}x')}")
    rl = r["roofline"]
    if "tokens_per_s" in rl:
        out.append(f"roofline: {rl['weight_bytes_per_token'] / 1e9:.3f} GB weights/token at "
                   f"{rl['bandwidth_gb_s']:.1f} GB/s copy -> {rl['tokens_per_s']:.2f} tok/s "
                   f"(read-only {rl['read_bandwidth_gb_s']:.1f} GB/s -> {rl['read_tokens_per_s']:.2f} tok/s)")
    for q, fig in r.get("quantized", {}).items():
        out.append("")
        how = ("decoder weight-only, no calibration" if precisions.get(q.split("-")[0]).kind == precisions.WEIGHT_ONLY
               else f"calibrated on {r.get('calib_limit')} built-in documents")
        out.append(f"Ours {q} vs ours fp32 (same passes; {how})")
        out.append(f"  decode {_f(fig.get('decode_tokens_per_s'), '{:.2f}')} tok/s "
                   f"({_f(fig.get('decode_speedup'), '{:.2f}x')}), prefill {_f(fig.get('prefill_ms'))} ms "
                   f"({_f(fig.get('prefill_speedup'), '{:.2f}x')}), peak rss {_f(fig.get('llm_peak_rss_mb'), '{:.0f}')}"
                   f" MiB; artifacts {_f((fig.get('export') or {}).get('bytes'), '{:.0f}')} bytes "
                   f"({_f(fig.get('bytes_ratio'), '{:.2f}x')} of fp32)")
        for px, v in fig.get("vision", {}).items():
            out.append(f"  vision {px}x{px}: {_f(v['ms'])} ms ({_f(v['speedup_vs_fp32'], '{:.2f}x')} vs fp32, "
                       f"{_f(v['speedup_vs_torch'], '{:.2f}x')} vs torch), peak rss {_f(v['peak_rss_mb'], '{:.0f}')} MiB")
    if r.get("peer_results"):
        from qvl_export.bench import peers

        fused = r["export"].get("fused", {})
        ours = {"fp32": {"decode_tokens_per_s": d.get("ort", {}).get("tokens_per_s"),
                         "prefill_ms": p.get("ort", {}).get("ms"), "build_s": fused.get("seconds"),
                         "build_peak_mb": fused.get("peak_rss_mb")}}
        for q, fig in r.get("quantized", {}).items():
            ours[q] = {"decode_tokens_per_s": fig.get("decode_tokens_per_s"), "prefill_ms": fig.get("prefill_ms"),
                       "build_s": (fig.get("export") or {}).get("seconds"),
                       "build_peak_mb": (fig.get("export") or {}).get("peak_rss_mb")}
        out += peers.table_lines(r["peer_results"], ours)
    out.append("")
    out.append("Export: " + ", ".join(
        f"{v} {_f(e.get('seconds'))} s / {_f(e.get('peak_rss_mb'), '{:.0f}')} MiB peak" if "seconds" in e
        else f"{v} skipped" for v, e in r["export"].items()))
    acc = r["acceptance"]
    out.append("")
    out.append("Acceptance" + ("" if acc["applies"] else f" ({acc['note']})") + ":")
    for key, item in acc.items():
        if isinstance(item, dict):
            met = {True: "met", False: "NOT met", None: "n/a"}[item["met"]]
            extra = ""
            if "dense_baseline" in item:
                extra = f" (dense {_f(item['dense_baseline'], '{:.2f}')}, torch {_f(item['torch'], '{:.2f}')})"
            out.append(f"  {key}: {_f(item['value'], '{:.2f}')} (goal {item['goal']}) {met}{extra}")
    prof = r.get("ort_profile") or {}
    for section in ("decoder_decode", "decoder_prefill", "vision"):
        s = prof.get(section)
        if s and s.get("ops"):
            ops = ", ".join(f"{o['op']} {o['share']:.0%}" for o in s["ops"][:6])
            out.append(f"ORT profile {section}: {s['wall_ms_per_run']:.1f} ms/run; {ops}")
    for w in r["warnings"]:
        out.append(f"warning: {w}")
    return "\n".join(out)


def plot(r: dict, path: "Path") -> None:
    """Encoder time vs pixel count, one line per engine (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for engine, label in LABELS.items():
        xs, ys = [], []
        for row in r["vision"].values():
            if "ms" in row[engine]:
                xs.append(row["pixels"] / 1e6)
                ys.append(row[engine]["ms"])
        if xs:
            ax.plot(xs, ys, marker="o", label=label)
    if not ax.lines:
        ax.text(0.5, 0.5, "no vision figures (see bench.json warnings)", ha="center", transform=ax.transAxes)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("page pixels (millions)")
    ax.set_ylabel("vision encoder time (ms, median)")
    cfg = r["config"]
    ax.set_title(f"{r['model']}: ViT {cfg['vision']['depth']}x{cfg['vision']['hidden']}, {r['threads']} threads, fp32",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

