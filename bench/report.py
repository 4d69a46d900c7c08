"""Output of bench/throughput.py: scaling columns, the markdown table and summary, CSV/JSON, the plot, metadata."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

from clipfast.presets import from_name

ROOT = Path(__file__).resolve().parents[1]
# clipfast_graph: CUDA graphs (clipfast.graph); clipfast_ds: --deepspeed, the trainer's DeepSpeed engine
# clipfast_kernels: --kernels, the opt-in kernels (layer norm, vision attention, MLP); clipfast_graph_kernels: both
IMPLS = ("clipfast", "clipfast_compiled", "clipfast_kernels", "clipfast_graph", "clipfast_graph_kernels", "clipfast_ds",
         "open_clip")


# ratio key -> (implementation, baseline): samples/s over samples/s, in every row (None where either is missing)
RATIOS = {"vs_open_clip": ("clipfast", "open_clip"), "graph_vs_open_clip": ("clipfast_graph", "open_clip"),
          "graph_kernels_vs_open_clip": ("clipfast_graph_kernels", "open_clip"),
          "graph_kernels_vs_graph": ("clipfast_graph_kernels", "clipfast_graph"),
          "compiled_vs_open_clip": ("clipfast_compiled", "open_clip"),
          "kernels_vs_clipfast": ("clipfast_kernels", "clipfast"),
          "ds_vs_open_clip": ("clipfast_ds", "open_clip")}


def full_points(rows: list[dict]) -> dict[str, dict]:
    """Each preset's full-token row (its own size and context length, no mask), where the run has one."""
    full = {}
    for r in rows:
        cfg = from_name(r["preset"])
        if (r["image_px"], r["mask"], r["text_len"]) == (cfg.vision.image_size, 0.0, cfg.text.context_length):
            full[r["preset"]] = r
    return full


def add_scaling(rows: list[dict]) -> None:
    """Speed-up over the same preset's full-token point, the FLOP ratio, their quotient; clipfast / open_clip."""
    full = full_points(rows)
    for r in rows:
        f = full.get(r["preset"])
        r["flop_ratio"] = round(f["gflop_per_sample"] / r["gflop_per_sample"], 3) if f else None
        for impl in IMPLS:
            key = f"{impl}_samples_s"
            ok = f is not None and r.get(key) and f.get(key)
            r[f"{impl}_speedup"] = round(r[key] / f[key], 3) if ok else None
            r[f"{impl}_scaling_eff"] = round(r[f"{impl}_speedup"] / r["flop_ratio"], 3) if ok else None
        for key, (num, den) in RATIOS.items():
            ok = r.get(f"{num}_samples_s") and r.get(f"{den}_samples_s")
            r[key] = round(r[f"{num}_samples_s"] / r[f"{den}_samples_s"], 3) if ok else None

# ---- output ---------------------------------------------------------------------------------------------------

def _fmt(x, nd) -> str:
    if x is None:
        return "–"
    return str(x) if nd is None else f"{x:g}" if nd == "g" else f"{x:.{nd}f}"


BOLD = tuple(key for key, (_, base) in RATIOS.items() if base == "open_clip")  # the ratios to open_clip, in bold


def markdown_table(rows: list[dict]) -> str:
    cols = [("preset", "preset", None), ("px", "image_px", None), ("mask", "mask", "g"),
            ("img tok", "image_tokens", None), ("text len", "text_len", None), ("txt tok", "text_tokens", 1),
            ("batch", "batch", None), ("clipfast ms", "clipfast_ms", 1), ("samples/s", "clipfast_samples_s", 1),
            ("tokens/s", "clipfast_tokens_s", 0), ("TFLOP/s", "clipfast_tflops", 3), ("MFU", "clipfast_mfu", 3),
            ("peak MiB", "clipfast_peak_mib", 0), ("speed-up", "clipfast_speedup", 2), ("FLOP ratio", "flop_ratio", 2),
            ("scaling eff", "clipfast_scaling_eff", 2), ("open_clip ms", "open_clip_ms", 1),
            ("open_clip samples/s", "open_clip_samples_s", 1), ("open_clip MiB", "open_clip_peak_mib", 0),
            ("open_clip speed-up", "open_clip_speedup", 2),
            ("open_clip / clipfast FLOPs", "open_clip_exec_flop_ratio", 2),
            ("compiled ms", "clipfast_compiled_ms", 1), ("compiled samples/s", "clipfast_compiled_samples_s", 1),
            ("compiled MFU", "clipfast_compiled_mfu", 3), ("compiled / open_clip", "compiled_vs_open_clip", 2),
            ("kernels ms", "clipfast_kernels_ms", 1), ("kernels samples/s", "clipfast_kernels_samples_s", 1),
            ("kernels MFU", "clipfast_kernels_mfu", 3), ("kernels MiB", "clipfast_kernels_peak_mib", 0),
            ("kernels / clipfast", "kernels_vs_clipfast", 3),
            ("graphs ms", "clipfast_graph_ms", 1), ("graphs samples/s", "clipfast_graph_samples_s", 1),
            ("graphs MFU", "clipfast_graph_mfu", 3), ("graphs scaling eff", "clipfast_graph_scaling_eff", 2),
            ("graphs / open_clip", "graph_vs_open_clip", 2),
            ("graphs+kernels ms", "clipfast_graph_kernels_ms", 1),
            ("graphs+kernels samples/s", "clipfast_graph_kernels_samples_s", 1),
            ("graphs+kernels MFU", "clipfast_graph_kernels_mfu", 3),
            ("graphs+kernels scaling eff", "clipfast_graph_kernels_scaling_eff", 2),
            ("graphs+kernels MiB", "clipfast_graph_kernels_peak_mib", 0),
            ("graphs+kernels / graphs", "graph_kernels_vs_graph", 3),
            ("graphs+kernels / open_clip", "graph_kernels_vs_open_clip", 2),
            ("DeepSpeed ms", "clipfast_ds_ms", 1), ("DeepSpeed samples/s", "clipfast_ds_samples_s", 1),
            ("DeepSpeed MiB", "clipfast_ds_peak_mib", 0), ("DeepSpeed / open_clip", "ds_vs_open_clip", 2),
            ("clipfast / open_clip", "vs_open_clip", 2)]
    cols = [c for c in cols if any(r.get(c[1]) is not None for r in rows)]  # no empty columns (MFU on CPU, ...)
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [_fmt(r.get(key), nd) for _, key, nd in cols]
        for i, (_, key, _) in enumerate(cols):
            if key in BOLD and r.get(key):
                cells[i] = f"**{r[key]:.2f}×**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _stats(rs, key="vs_open_clip"):
    xs = [r[key] for r in rs]
    return f"min {min(xs):.2f}×, median {statistics.median(xs):.2f}×, max {max(xs):.2f}× ({len(xs)} points)"


def summary(rows: list[dict], mlp: str = "kernels.linear_gelu") -> str:
    """The clipfast / open_clip ratio over all points and per kind of point: masked, padded (>= 25% of the text
    length is padding), neither; the kernels column (its MLP: `mlp`) against plain clipfast."""
    with_kernels = [r for r in rows if r.get("kernels_vs_clipfast")]
    kernels = (f" With the opt-in kernels (kernels.layer_norm, kernels.short_attention, {mlp}) / "
               f"without: {_stats(with_kernels, 'kernels_vs_clipfast')}." if with_kernels else "")
    graph_kernels = [r for r in rows if r.get("graph_kernels_vs_graph")]
    if graph_kernels:
        kernels += (f" As CUDA graphs, with the kernels / without: {_stats(graph_kernels, 'graph_kernels_vs_graph')}.")
    rated = [r for r in rows if r.get("vs_open_clip")]
    if not rated:
        return "open_clip column absent: no ratio." + kernels

    lo = min(rated, key=lambda r: r["vs_open_clip"])
    out = [f"clipfast / open_clip samples/s: {_stats(rated)}; the lowest at {lo['preset']} {lo['image_px']} px, mask "
           f"{lo['mask']:g}, text {lo['text_len']}."]
    kinds = {"masked": [r for r in rated if r["mask"] > 0],
             "padded, unmasked": [r for r in rated if r["mask"] == 0 and r["pad_frac"] >= 0.25],
             "neither": [r for r in rated if r["mask"] == 0 and r["pad_frac"] < 0.25]}
    out += [f"{kind.capitalize()}: {_stats(rs)}." for kind, rs in kinds.items() if rs]
    if any(r["clipfast_ms"] != r["clipfast_wall_ms"] for r in rated):
        out.append(f"By wall clock (loaded machine): {_stats(rated, 'vs_open_clip_wall')}.")
    compiled = [r for r in rated if r.get("compiled_vs_open_clip")]
    if compiled:
        out.append(f"With compiled blocks (CLIP.compile_blocks) / open_clip: "
                   f"{_stats(compiled, 'compiled_vs_open_clip')}.")
    graphed = [r for r in rated if r.get("graph_vs_open_clip")]
    if graphed:
        out.append(f"With CUDA graphs (clipfast.graph) / open_clip: {_stats(graphed, 'graph_vs_open_clip')}.")
    graphed_k = [r for r in rated if r.get("graph_kernels_vs_open_clip")]
    if graphed_k:
        out.append(f"CUDA graphs with the opt-in kernels / open_clip: "
                   f"{_stats(graphed_k, 'graph_kernels_vs_open_clip')}.")
    ds = [r for r in rated if r.get("ds_vs_open_clip")]
    if ds:
        out.append(f"Through DeepSpeed's engine (clipfast.train's step) / open_clip: {_stats(ds, 'ds_vs_open_clip')}.")
    return " ".join(out) + kernels


# issue 7's GPU goals: at these (preset, px, mask, text length) points, clipfast's fastest column at least RATIO x
# open_clip's samples/s, MFU and scaling efficiency (its speed-up over the preset's full-token point / the FLOP ratio)
# at least these
GOAL_POINTS = (("ViT-B-16", 112, 0.0, 16), ("ViT-L-16", 96, 0.0, 8))
GOAL_RATIO, GOAL_MFU, GOAL_SCALING = 2.0, 0.45, 0.85


def _mark(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _against(value: float, goal: float, digits: int) -> str:
    """value to `digits` decimals, or as many more as it takes for a miss not to print as the mark itself (0.4495
    against 0.45 printed 0.450)."""
    text = f"{value:.{digits}f}"
    while digits < 6 and (value >= goal) != (float(text) >= goal):
        digits += 1
        text = f"{value:.{digits}f}"
    return text


def goals(rows: list[dict]) -> str:
    """Issue 7's GPU goals, met or not, at the goal points this run measured with MFU (a GPU) and open_clip's column:
    per point the fastest clipfast column's ratio to open_clip, MFU and scaling efficiency. "" where there is none."""
    lines, full = [], full_points(rows)
    for r in rows:
        point = (r["preset"], r["image_px"], r["mask"], r["text_len"])
        if point not in GOAL_POINTS or not r.get("open_clip_samples_s"):
            continue
        timed = [(impl, name) for impl, name in LABELS  # clipfast's columns, with the plot's names
                 if impl != "open_clip" and r.get(f"{impl}_samples_s") and r.get(f"{impl}_mfu")]
        if not timed:
            continue
        impl, name = max(timed, key=lambda c: r[f"{c[0]}_samples_s"])
        ratio, mfu = r[f"{impl}_samples_s"] / r["open_clip_samples_s"], r[f"{impl}_mfu"]
        eff = r.get(f"{impl}_scaling_eff")
        if eff is not None:
            eff_text = f"{_against(eff, GOAL_SCALING, 2)} ({_mark(eff >= GOAL_SCALING)})"
        elif r["preset"] not in full:
            eff_text = "– (no full-token point)"
        else:
            eff_text = f"– (no {name} column at the full-token point)"
        lines.append(f"| {r['preset']} {r['image_px']} px / {r['text_len']}, batch {r['batch']} | {name} | "
                     f"{r[f'{impl}_ms']:.1f} | {_against(ratio, GOAL_RATIO, 2)}x ({_mark(ratio >= GOAL_RATIO)}) | "
                     f"{_against(mfu, GOAL_MFU, 3)} ({_mark(mfu >= GOAL_MFU)}) | {eff_text} |")
    if not lines:
        return ""
    return (f"Issue 7's GPU goals ({GOAL_RATIO:g}x open_clip, MFU >= {GOAL_MFU:g}, scaling efficiency >= "
            f"{GOAL_SCALING:g}), the fastest clipfast column at each goal point:\n\n"
            "| point | column | ms | / open_clip | MFU | scaling eff |\n|---|---|---|---|---|---|\n" + "\n".join(lines))


# the columns a plot draws, in order: (implementation, label)
LABELS = (("open_clip", "open_clip"), ("clipfast", "clipfast"), ("clipfast_compiled", "compiled blocks"),
          ("clipfast_kernels", "opt-in kernels"), ("clipfast_ds", "via DeepSpeed"), ("clipfast_graph", "CUDA graphs"),
          ("clipfast_graph_kernels", "CUDA graphs + kernels"))


def _wrapped(title: str, width_in: float) -> str:
    """The title on as many lines as a figure this wide needs (~10 characters an inch at matplotlib's 12 pt)."""
    import textwrap

    return "\n".join(textwrap.wrap(title, max(40, int(width_in * 10))))


def plot(rows: list[dict], path: Path, title: str) -> None:
    """throughput against image tokens, a line per preset and text length; where no line has two points (a run of
    single --points), grouped bars per point instead (plot_points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    series = {}
    for r in rows:
        if not r["mask"]:
            series.setdefault((r["preset"], r["text_len"]), set()).add(r["image_tokens"])
    if series and max(len(v) for v in series.values()) < 2:
        plot_points(rows, path, title)
        return
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    lens = sorted({r["text_len"] for r in rows})
    colors = {p: f"C{i}" for i, p in enumerate(presets)}
    markers = dict(zip(lens, "osD^v<>p*h"))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for p in presets:
        for t in lens:
            for impl, ls, alpha in (("clipfast", "-", 1.0), ("clipfast_compiled", (0, (5, 1, 1, 1)), 1.0),
                                    ("clipfast_kernels", (0, (1, 1)), 1.0),
                                    ("clipfast_graph", ":", 1.0), ("clipfast_graph_kernels", (0, (3, 1)), 1.0),
                                    ("clipfast_ds", "-.", 0.8),
                                    ("open_clip", "--", 0.45)):
                pts = sorted((r["image_tokens"], r[f"{impl}_samples_s"], r["mask"] > 0) for r in rows
                             if r["preset"] == p and r["text_len"] == t and r.get(f"{impl}_samples_s"))
                if not pts:
                    continue
                line = [(x, y) for x, y, masked in pts if not masked]
                if line:
                    ax.plot(*zip(*line), ls=ls, color=colors[p], marker=markers[t], alpha=alpha)
                for x, y, masked in pts:
                    if masked:
                        ax.plot([x], [y], ls="", marker=markers[t], color=colors[p], mfc="none", ms=9, alpha=alpha)
    for p in presets:
        ax.plot([], [], color=colors[p], lw=3, label=p)
    for t in lens:
        ax.plot([], [], ls="", color="k", marker=markers[t], label=f"text {t}")
    ax.plot([], [], color="gray", ls="-", label="clipfast")
    if any(r.get("clipfast_compiled_samples_s") for r in rows):
        ax.plot([], [], color="gray", ls=(0, (5, 1, 1, 1)), label="clipfast, compiled blocks")
    if any(r.get("clipfast_kernels_samples_s") for r in rows):
        ax.plot([], [], color="gray", ls=(0, (1, 1)), label="clipfast + opt-in kernels")
    if any(r.get("clipfast_graph_samples_s") for r in rows):
        ax.plot([], [], color="gray", ls=":", label="clipfast + CUDA graphs")
    if any(r.get("clipfast_graph_kernels_samples_s") for r in rows):
        ax.plot([], [], color="gray", ls=(0, (3, 1)), label="clipfast + CUDA graphs + opt-in kernels")
    if any(r.get("clipfast_ds_samples_s") for r in rows):
        ax.plot([], [], color="gray", ls="-.", label="clipfast via DeepSpeed")
    ax.plot([], [], color="gray", ls="--", alpha=0.45, label="open_clip")
    ax.plot([], [], ls="", marker="o", mfc="none", color="gray", label="masked (largest size)")
    ax.set(xscale="log", yscale="log", xlabel="image tokens per sample (kept patches)", ylabel="samples / s",
           title=_wrapped(title, 9))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    # 1, 2 and 5 of each decade labelled: a grid within one decade (the CPU's, 3-20 samples/s) showed a single "10"
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xticks(sorted({r["image_tokens"] for r in rows}))  # the measured token counts, not log decades
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_points(rows: list[dict], path: Path, title: str) -> None:
    """One group of bars per point (preset, px, mask, text length), one bar per measured column: samples/s, each
    labelled with its ratio to open_clip, and a dashed mark at twice open_clip's (issue 7's GPU goal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [(k, label) for k, label in LABELS if any(r.get(f"{k}_samples_s") for r in rows)]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 + 0.5 * len(cols) * len(rows)), 5.2))
    width = 0.8 / len(cols)
    for j, (k, label) in enumerate(cols):
        for i, r in enumerate(rows):
            y = r.get(f"{k}_samples_s")
            if not y:
                continue
            x = i - 0.4 + width * (j + 0.5)
            ax.bar(x, y, width, color=f"C{j}", label=label if label not in ax.get_legend_handles_labels()[1] else None)
            base = r.get("open_clip_samples_s")
            if base and k != "open_clip":
                ax.text(x, y, f"{y / base:.2f}×", ha="center", va="bottom", fontsize=7, rotation=90)
    for i, r in enumerate(rows):
        if r.get("open_clip_samples_s"):
            ax.plot([i - 0.42, i + 0.42], [2 * r["open_clip_samples_s"]] * 2, ls="--", color="gray", lw=1,
                    label="2x open_clip" if i == 0 else None)
    ax.set_xticks(range(len(rows)))
    def name(r):
        mask = f", mask {r['mask']:g}" if r["mask"] else ""
        return f"{r['preset']}\n{r['image_px']} px{mask}, text {r['text_len']}\nbatch {r['batch']}"

    ax.set_xticklabels([name(r) for r in rows], fontsize=8)
    ax.set(ylabel="samples / s (training step)", title=_wrapped(title, fig.get_figwidth()))
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # room for the ratios
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(folder: Path, commit: str | None = None) -> Path:
    """throughput.png again from a results folder's throughput.json (e.g. after the plot changed); commit replaces
    the one the run recorded, in the title, where that was wrong."""
    data = json.loads((folder / "throughput.json").read_text())
    meta = data["meta"]
    path = folder / "throughput.png"
    commit = commit or meta["commit"]
    plot(data["rows"], path, f"training throughput, {meta['device']}, {meta['date']}, commit {commit}")
    return path


def ab_table(folders: list[Path], open_clip: Path | None = None, column: str = "clipfast_graph_kernels") -> str:
    """The A/B runs of one machine side by side (gpu_suite.sh's kernels_ab1/, kernels_ab2/, ...): one row per folder,
    its knobs ("defaults" where none, "not recorded" in a run from before --knob), then per point the column's
    median ms (IQR), its MFU and its change against the first folder's; with open_clip (a folder of the same points
    with the open_clip column, e.g. kernels/) also the ratio to open_clip's ms there."""
    runs = [(f, json.loads((f / "throughput.json").read_text())) for f in folders]
    if not runs:
        raise ValueError("ab_table: no folders")
    key = lambda r: (r["preset"], r["image_px"], r["mask"], r["text_len"])  # noqa: E731
    ref = {}
    if open_clip is not None:
        ref = {key(r): r["open_clip_ms"] for r in json.loads((open_clip / "throughput.json").read_text())["rows"]
               if r.get("open_clip_ms")}
    points = list(dict.fromkeys(key(r) for _, d in runs for r in d["rows"]))
    first = {key(r): r.get(f"{column}_ms") for r in runs[0][1]["rows"]}
    head = ["variant", "knobs"] + [f"{p[0]} {p[1]} px / {p[3]}" + (f", mask {p[2]:g}" if p[2] else "") for p in points]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for folder, data in runs:
        knobs = data["meta"].get("knobs")  # (not in the runs before --knob)
        cells = [folder.name, "not recorded" if knobs is None else
                 ", ".join(f"{k}={v}" for k, v in knobs.items()) or "defaults"]
        rows = {key(r): r for r in data["rows"]}
        for p in points:
            r = rows.get(p, {})
            ms = r.get(f"{column}_ms")
            if ms is None:
                cells.append("–")
                continue
            cell = f"{ms:.2f} ms ({r.get(f'{column}_iqr_ms', float('nan')):.2f})"
            if r.get(f"{column}_mfu") is not None:
                cell += f", MFU {r[f'{column}_mfu']:.3f}"
            if first.get(p) and folder != runs[0][0]:
                cell += f", {100 * (ms / first[p] - 1):+.1f}%"
            if ref.get(p):
                cell += f", {ref[p] / ms:.2f}x open_clip"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    note = f"{column}: median ms per step (IQR), MFU, change against {runs[0][0].name}"
    if open_clip is not None:
        note += f", ratio to open_clip's ms in {open_clip.name}"
    return "\n".join(lines) + "\n\n" + note + "\n"


def device_info(device: torch.device) -> tuple[str, str]:
    """(human name, folder slug)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        model = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    short = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)|processor|cpu", "", model.lower())).strip("-")
    name = f"CPU {model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return name, f"cpu-{short[:30]}-{os.cpu_count()}c"


def git_commit() -> str:
    if os.environ.get("CLIPFAST_COMMIT"):
        return os.environ["CLIPFAST_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "clipfast", "kernels", "bench/throughput.py",
                                "bench/points.py", "bench/steps.py", "bench/measure.py"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def readme_section(md: str, png: Path | str, command: str = "python bench/throughput.py") -> str:
    return (f"### Throughput (`{command}`; method in [bench/README.md](bench/README.md))\n\n{md}\n\n"
            f"![throughput]({png})")


def update_readme(md: str, readme: Path = ROOT / "README.md") -> None:
    """What lies between the README's bench markers (the latest CPU default run: its heading, table, summary and
    plot; the hand-written sections around them stay) replaced by md."""
    text = readme.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    i, j = text.index(start) + len(start), text.index(end)
    readme.write_text(text[:i] + "\n" + md.strip() + "\n" + text[j:])


def write_outputs(rows: list[dict], meta: dict, skipped: list[str], out: Path, t0: float) -> str:
    """throughput.{md,csv,json} from the rows so far; returns the markdown."""
    order = {p: i for i, p in enumerate(dict.fromkeys(r["preset"] for r in rows))}
    rows.sort(key=lambda r: (order[r["preset"]], r["mask"], r["image_px"], r["text_len"]))
    add_scaling(rows)
    meta = dict(meta, load_end=os.getloadavg(), wall_s=round(time.perf_counter() - t0, 1), skipped=skipped,
                summary=summary(rows, meta.get("kernels_mlp", "kernels.linear_gelu")))
    loads = [r["load_1min"] for r in rows]
    header = (f"**{meta['device']}**, {meta['date']}, commit `{meta['commit']}`, torch {meta['torch']}, triton "
              f"{meta['triton']}, {meta['open_clip'] or 'no open_clip column'}, {meta['precision']}; load (1 min) "
              f"{min(loads, default=0):.1f}–{max(loads, default=0):.1f}. Captions: {meta['captions']}. "
              f"Timing: {meta['timing']}.")
    md = header + "\n\n" + markdown_table(rows) + "\n\n" + meta["summary"]
    verdict = goals(rows)
    if verdict:
        md += "\n\n" + verdict
    if skipped:
        md += f"\n\nNot measured: {'; '.join(skipped)}."
    (out / "throughput.md").write_text(md + "\n")
    with open(out / "throughput.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    (out / "throughput.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return md


if __name__ == "__main__":  # python bench/report.py --replot bench/results/<folder> [...]
    import argparse
    import sys

    sys.path.insert(0, str(ROOT))
    ap = argparse.ArgumentParser(description="redraw throughput.png from the throughput.json in each folder, or "
                                             "print the A/B runs' table")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--replot", nargs="+", type=Path)
    what.add_argument("--ab", nargs="+", type=Path, help="A/B folders (gpu_suite.sh's kernels_ab*), the first the base")
    what.add_argument("--goals", nargs="+", type=Path, help="print issue 7's goals, met or not, for each folder's run")
    ap.add_argument("--commit", help="the commit to name in the titles, where the run recorded a wrong one")
    ap.add_argument("--open-clip", type=Path, help="with --ab: a folder of the same points with open_clip's column")
    args = ap.parse_args()
    missing = [str(f) for f in [*(args.replot or ()), *(args.ab or ()), *(args.goals or ()),
                                *([args.open_clip] if args.open_clip else [])] if not (f / "throughput.json").is_file()]
    if missing:
        ap.error(f"no throughput.json in {', '.join(missing)} (a folder bench/throughput.py --out wrote)")
    if args.ab:
        print(ab_table(args.ab, args.open_clip))
    for f in args.replot or ():
        print("wrote", replot(f, args.commit))
    for f in args.goals or ():
        rows = json.loads((f / "throughput.json").read_text())["rows"]
        add_scaling(rows)
        print(f"{f}:\n\n{goals(rows) or 'no goal point with MFU and an open_clip column'}\n")
