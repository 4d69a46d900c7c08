"""Training curves of one or more runs, as one PNG: loss, zero-shot results, learning rate, samples/s, MFU.

    python -m clipfast.plot runs/demo                       # -> runs/demo/curves.png
    python -m clipfast.plot runs/a runs/b --x samples --out compare.png

A run folder is what clipfast.train writes (metrics.jsonl, evals.jsonl, eval.json, config.json). A multi-stage run
(clipfast.stages: stages.json and a folder per stage) is drawn as one curve through its stages, in their order, with
each stage's start marked. After a resume, metrics.jsonl can hold a step twice (logged, then run again from an
earlier checkpoint): the later line wins. The x axis is the step or, with --x samples, the samples seen (step x the
stage's global batch), which is what compares runs of different batch sizes. Also prints a line per run: steps,
final loss, median samples/s, the last evaluation. Needs matplotlib.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# (panel title, where the value comes from, its key), after the loss: a panel per evaluation set the runs hold
# (eval_panels), then these; a panel only where some run has the value
PANELS = [("learning rate", "metrics", "lr"), ("samples/s", "metrics", "samples_per_s"), ("MFU", "metrics", "mfu")]
EVAL_VALUES = {"top1": "zero-shot top-1", "mean_recall": "retrieval mean recall"}  # the one value drawn per set


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:  # a line cut short by a crash mid-write: named, not fatal
                print(f"warning: {path}:{n} is not JSON ({e}); left out")
    return out


def _by_step(records: list[dict]) -> list[dict]:
    """One record per step, the last logged (a resumed run logs again the steps after its checkpoint), by step."""
    return sorted({r["step"]: r for r in records if "step" in r}.values(), key=lambda r: r["step"])


def _flat_eval(rec: dict) -> dict:
    """An evals.jsonl line ({"step", "zeroshot": {...}, "retrieval:coco": {...}, ...}) or eval.json (the first
    zero-shot set's keys at the top, the others nested) -> {"step", "zeroshot/top1", "retrieval:coco/mean_recall",
    ...}."""
    flat = {"step": rec["step"]}
    for task, res in rec.items():
        if isinstance(res, dict):
            for k, v in res.items():
                flat[f"{task}/{k}"] = v
    if "top1" in rec:
        flat.update({"zeroshot/top1": rec["top1"], "zeroshot/top5": rec.get("top5")})
    return flat


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} does not parse as JSON ({e})") from None


def read_run(path: str | Path) -> list[dict]:
    """The run's stages in order (a single-stage run: one), each {"name", "batch_size", "metrics", "evals"}."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no run folder at {str(path)!r}")
    planned = (_json(path / "config.json") or {}).get("stages") if (path / "config.json").is_file() else None
    if (path / "stages.json").is_file():
        folders = [path / st["stage"] for st in _json(path / "stages.json")]
    elif planned:  # a staged run not finished (running, or stopped by a signal): the stages begun so far
        names = [st.get("name", f"stage{i}") for i, st in enumerate(planned)]  # (clipfast.stages' names)
        folders = [path / n for n in names if (path / n / "metrics.jsonl").is_file()]
        if not folders:
            raise FileNotFoundError(f"{str(path)!r} is a staged run whose first stage ({names[0]}) has logged nothing "
                                    f"yet")
    elif (path / "metrics.jsonl").is_file():
        folders = [path]
    else:
        raise FileNotFoundError(f"{str(path)!r} holds neither metrics.jsonl nor stages.json: not a clipfast run")
    stages = []
    for folder in folders:
        cfg = _json(folder / "config.json") if (folder / "config.json").is_file() else {}
        evals = [_flat_eval(r) for r in _jsonl(folder / "evals.jsonl")]
        if not evals and (folder / "eval.json").is_file():  # runs from before evals.jsonl: the final result only
            evals = [_flat_eval(_json(folder / "eval.json"))]
        stages.append({"name": folder.name, "batch_size": cfg.get("batch_size"),
                       "metrics": _by_step(_jsonl(folder / "metrics.jsonl")), "evals": _by_step(evals)})
    return stages


def series(stages: list[dict], source: str, key: str, x: str = "step") -> tuple[list[float], list[float], list]:
    """(xs, ys, stage starts as (x, name)) of one value through the stages, x cumulative across them."""
    xs, ys, starts, offset = [], [], [], 0.0
    for st in stages:
        per = 1 if x == "step" else st["batch_size"]
        if per is None:
            raise ValueError(f"--x samples needs the global batch size: stage {st['name']!r} has no config.json")
        starts.append((offset, st["name"]))
        for r in st[source]:
            if r.get(key) is not None:
                xs.append(offset + r["step"] * per)
                ys.append(r[key])
        last = max((r["step"] for r in st["metrics"] + st["evals"]), default=0)
        offset += last * per
    return xs, ys, starts


def eval_panels(read: dict) -> list[tuple[str, str, str]]:
    """A panel per evaluation set and drawn value in the runs, in the order first seen: ("zero-shot top-1", "evals",
    "zeroshot/top1"), ("retrieval mean recall, coco", "evals", "retrieval:coco/mean_recall"), ..."""
    keys = dict.fromkeys(k for stages in read.values() for st in stages for r in st["evals"] for k in r
                         if k.rsplit("/", 1)[-1] in EVAL_VALUES)
    panels = []
    for key in keys:
        task, value = key.rsplit("/", 1)
        name = task.partition(":")[2]
        panels.append((EVAL_VALUES[value] + (f", {name}" if name else ""), "evals", key))
    return panels


def summary(name: str, stages: list[dict]) -> str:
    metrics = [r for st in stages for r in st["metrics"]]
    evals = [r for st in stages for r in st["evals"]]
    parts = [f"{name}: {sum(max((r['step'] for r in st['metrics']), default=0) for st in stages)} steps"]
    if metrics:
        parts.append(f"final loss {metrics[-1]['loss']:.4f}")
        parts.append(f"median {statistics.median(r['samples_per_s'] for r in metrics):.0f} samples/s")
    for title, _, key in eval_panels({name: stages}):  # the last evaluation of each set
        if evals and evals[-1].get(key) is not None:
            parts.append(f"{title} {100 * evals[-1][key]:.2f}%")
    return ", ".join(parts)


def plot(runs: list[str], out: str, x: str = "step") -> list[str]:
    """Draws every run's curves into `out`; returns the panels drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"clipfast.plot needs matplotlib ({e}): pip install matplotlib") from None
    read = {r: read_run(r) for r in runs}
    candidates = [("training loss", "metrics", "loss"), *eval_panels(read), *PANELS]
    panels = [p for p in candidates if any(series(st, p[1], p[2], x)[0] for st in read.values())]
    if not panels:
        raise SystemExit(f"clipfast.plot: nothing to draw yet: {', '.join(map(repr, runs))} logged no step "
                         f"(metrics.jsonl gets a line every log_every steps)")
    cols = 3 if len(panels) > 4 else 2
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, source, key) in zip(axes.flat, panels):
        for run, stages in read.items():
            xs, ys, starts = series(stages, source, key, x)
            line, = ax.plot(xs, ys, marker="o" if source == "evals" else None, ms=4, label=Path(run).name or run)
            for sx, name in starts[1:]:  # each later stage's start
                ax.axvline(sx, color=line.get_color(), ls=":", lw=1)
                ax.annotate(name, (sx, 1), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                            va="top", ha="right", color=line.get_color())
        ax.set_title(title)
        ax.set_xlabel("samples seen" if x == "samples" else "step")
        ax.grid(alpha=0.3)
        if key == "loss":
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    for run, stages in read.items():
        print(summary(run, stages))
    return [p[0] for p in panels]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (out_dir of clipfast.train)")
    ap.add_argument("--out", default="", help="PNG to write (default: curves.png in the first run's folder)")
    ap.add_argument("--x", choices=("step", "samples"), default="step")
    args = ap.parse_args(argv)
    out = args.out or str(Path(args.runs[0]) / "curves.png")
    try:
        panels = plot(args.runs, out, args.x)
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    print(f"wrote {out} ({', '.join(panels)})")
    return out


if __name__ == "__main__":
    main()
