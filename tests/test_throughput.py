"""bench/throughput.py: a fast smoke run of the harness on the tiny `demo` preset, and its building blocks."""
import csv
import json
import sys

import pytest
import torch

from bench import points, report, steps
from bench import throughput as tp
from clipfast.reduce import num_kept

TINY_RUN = ["--batch", "4", "--steps", "2", "--warmup", "1", "--batches", "1", "--device", "cpu"]
TINY = ["--presets", "demo", "--sizes", "16", "--masks", "0.5", "--text-lens", "8", *TINY_RUN]


def test_caption_lengths_lognormal_median_12_clipped():
    gen = torch.Generator().manual_seed(0)
    n = points.caption_lengths(20000, 77, gen)
    assert n.min() >= 2 and n.max() <= 77
    assert 11 <= n.median().item() <= 13
    short = points.caption_lengths(20000, 8, gen)
    assert short.max() == 8 and (short == 8).float().mean() > 0.6  # most captions are cut at a short text length


def test_batch_packed_and_padded_hold_the_same_captions():
    gen = torch.Generator().manual_seed(1)
    b = points.make_batch(5, 32, 16, gen, "cpu", torch.float32)
    assert b.cu_seqlens[-1] == b.text.numel() == int(b.lengths.sum()) and b.max_len == int(b.lengths.max())
    for i in range(5):
        row = b.text[b.cu_seqlens[i]:b.cu_seqlens[i + 1]].long()
        assert torch.equal(b.padded[i, : len(row)], row) and not b.padded[i, len(row):].any()
        assert row[0] == points.SOT_ID and row[-1] == points.EOT_ID and b.padded[i].argmax() == len(row) - 1
    assert b.images.dtype == torch.uint8 and b.pixels.shape == b.images.shape


def test_grid_snaps_to_patch_and_puts_full_point_first():
    groups = points.grid_points(["H/14", "demo"], [64, 160, 224], [0.5], [8, 77])
    h = groups["ViT-H-14"]
    assert h[0] == points.Point("ViT-H-14", 224, 0.0, 77)
    assert sorted({p.size for p in h}) == [70, 154, 224] and all(p.size % 14 == 0 for p in h)
    assert len(h) == len(set(h)) == 3 * 2 + 2  # the full point (224, 77) is not measured twice
    assert {p.mask for p in h if p.mask} == {0.5} and all(p.size == 224 for p in h if p.mask)
    assert groups["demo"][0] == points.Point("demo", 32, 0.0, 16)
    rn = points.grid_points(["demo-rn"], [32, 64], [0.5], [8])["demo-rn"]  # a ResNet: no mask points (at 32 px, one
    assert rn and not any(p.mask for p in rn)  # 1x1 cell, one had been labelled mask=0.5 with nothing masked)


@pytest.mark.parametrize("mask", [0.3, 0.5, 0.75, 0.9])
def test_open_clip_patch_dropout_keeps_clipfasts_count(mask):
    open_clip = pytest.importorskip("open_clip")
    cfg = tp.from_name("ViT-B-16", **{"vision.image_size": 112})
    kw = steps.open_clip_kwargs(cfg, mask)
    n = cfg.vision.num_patches
    drop = open_clip.transformer.PatchDropout(kw["vision_cfg"]["patch_dropout"]).train()
    out = drop(torch.zeros(2, n + 1, 4))  # class token + patches
    assert out.shape[1] - 1 == num_kept(n, mask)
    assert "patch_dropout" not in steps.open_clip_kwargs(cfg, 0.0)["vision_cfg"]


def test_smoke_run_writes_results_side_by_side(tmp_path):
    rows = tp.main(TINY + ["--out", str(tmp_path)])
    assert len(rows) == 3  # (32 px, 16) full, (16 px, 8), (16 px, mask 0.5, 8)
    for f in ("throughput.md", "throughput.csv", "throughput.json", "throughput.png"):
        assert (tmp_path / f).stat().st_size > 0
    data = json.loads((tmp_path / "throughput.json").read_text())
    meta = data["meta"]
    for key in ("device", "date", "commit", "torch", "triton", "load_start", "load_end", "captions", "timing"):
        assert meta[key], key
    assert "packed" in meta["captions"] and "padded" in meta["captions"]
    steps_arg, warmup_arg = TINY[TINY.index("--steps") + 1], TINY[TINY.index("--warmup") + 1]
    assert f"{steps_arg} steps per column, interleaved, after {warmup_arg} warm-up" in meta["timing"]  # how many
    full = next(r for r in data["rows"] if (r["image_px"], r["text_len"]) == (32, 16))
    assert full["clipfast_speedup"] == 1.0 and full["flop_ratio"] == 1.0
    for r in data["rows"]:
        assert r["clipfast_samples_s"] > 0 and r["open_clip_samples_s"] > 0 and r["vs_open_clip"] > 0
        assert r["clipfast_peak_mib"] > 0 and r["open_clip_peak_mib"] > 0
        assert r["image_tokens"] == num_kept(r["image_px"] ** 2 // 64, r["mask"])
        assert (r["flop_ratio"] > 1) == (r is not full) and r["load_1min"] >= 0
    with open(tmp_path / "throughput.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    md = (tmp_path / "throughput.md").read_text()
    assert "clipfast / open_clip" in md and meta["device"] in md


def test_runs_without_open_clip(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` now raises ImportError
    rows = tp.main(TINY + ["--sizes", "32", "--masks", "--out", str(tmp_path)])
    assert len(rows) == 2 and all("open_clip_ms" not in r and r["vs_open_clip"] is None for r in rows)
    meta = json.loads((tmp_path / "throughput.json").read_text())["meta"]
    assert "not installed" in meta["open_clip"]
    assert "open_clip" not in (tmp_path / "throughput.md").read_text().split("\n")[2]  # no empty columns


def test_update_readme_replaces_only_the_bench_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n\ntail\n")
    report.update_readme("new table", readme)
    assert readme.read_text() == "# x\n\n<!-- bench:start -->\nnew table\n<!-- bench:end -->\n\ntail\n"


def test_point_batch_grows_by_powers_of_two_with_fewer_image_tokens():
    args = tp.parse_args(["--grid", "clipa", "--device", "cpu"])
    assert args.max_batch_scale == 4 and args.batch is None
    full = points.Point("ViT-B-16", 224, 0.0, 77)
    assert points.point_batch(args, full, 196) == 256
    assert points.point_batch(args, points.Point("ViT-B-16", 160, 0.0, 77), 100) == 256  # 1.96x fewer: not yet 2
    assert points.point_batch(args, points.Point("ViT-B-16", 112, 0.0, 16), 49) == 1024  # 4x fewer
    assert points.point_batch(args, points.Point("ViT-B-16", 112, 0.5, 16), 24) == 1024  # capped at 4x
    args.batch = 32
    assert points.point_batch(args, full, 196) == 32
    cpu = tp.parse_args(["--device", "cpu"])
    assert cpu.max_batch_scale == 1 and points.point_batch(cpu, points.Point("ViT-S-16", 64, 0.0, 8), 16) == cpu.batch


def test_deepspeed_column_times_the_trainers_engine(tmp_path):
    """--deepspeed: clipfast through DeepSpeed's engine as clipfast.train builds it (own process: it sets up
    torch.distributed with one rank)."""
    pytest.importorskip("deepspeed")
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "bench/throughput.py", *TINY, "--no-open-clip", "--deepspeed",
                        "--out", str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "throughput.json").read_text())["rows"]
    assert rows and all(row["clipfast_ds_ms"] > 0 and row["clipfast_ds_peak_mib"] > 0 for row in rows)
    assert "DeepSpeed ms" in (tmp_path / "throughput.md").read_text()
    assert "DeepSpeed column fp32" in (tmp_path / "throughput.md").read_text()  # whatever --precision says
    # on the CPU both hold fp32 weights and AdamW's two moments (12 bytes a parameter) and the same step's transients:
    # the DeepSpeed column counted 16 bytes a parameter (an fp32 copy that fp32 ZeRO stage 0 does not make), 25% more
    assert all(abs(row["clipfast_ds_peak_mib"] / row["clipfast_peak_mib"] - 1) < 0.05 for row in rows), rows


def test_step_profile_groups_the_time_of_both_steps(tmp_path, monkeypatch):
    import bench.steps as steps
    from bench import profile_step

    monkeypatch.setattr(steps, "LAYER_NORM", "torch")  # restored after the test: --layer-norm sets it for the run
    summaries = profile_step.main(["--preset", "demo", "--size", "16", "--text-len", "8", "--batch", "4",
                                   "--warmup", "1", "--steps", "1", "--device", "cpu", "--impls", "clipfast",
                                   "--layer-norm", "triton", "--out", str(tmp_path)])
    assert steps.LAYER_NORM == "triton"
    assert [s["impl"] for s in summaries] == ["clipfast"]
    s = summaries[0]
    assert s["wall_ms"] > 0 and 0 < s["busy_ms"] and s["groups"]["matmul"] > 0 and s["groups"]["optimizer"] > 0
    assert abs(sum(s["groups"].values()) - s["busy_ms"]) < 1e-6 * s["busy_ms"] + 1e-9
    md = (tmp_path / "profile.md").read_text()
    assert "| matmul |" in md and "ms per step" in md
    assert s["gpu_busy_ms"] is None  # CPU: no GPU timeline
    assert profile_step.covered([(5, 9), (0, 2), (1, 3), (8, 12), (20, 21)]) == 3 + 7 + 1
    assert profile_step.covered([]) == 0 and profile_step.covered([(0, 4), (1, 2)]) == 4
    # the idle gaps, by the kernel that ended last before each and the one after: over 2 steps, per step
    ks = [(0, 4, "a"), (1, 6, "b"), (8, 9, "c"), (9, 10, "a"), (13, 15, "b"), (14, 16, "c"), (18, 19, "c")]
    assert profile_step.idle_gaps(ks, steps=2) == [(1.5, 0.5, "a", "b"), (1.0, 0.5, "b", "c"),
                                                   (1.0, 0.5, "c", "c")]
    assert profile_step.idle_gaps([], 1) == [] and profile_step.idle_gaps(ks, 1, top=1) == [(3, 1, "a", "b")]
    assert profile_step.group_of("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert profile_step.group_of("flash_fwd_kernel") == "attention"
    assert profile_step.group_of("_layer_norm_bwd_kernel") == "norm"
    assert set(profile_step.BUILDERS) >= {"clipfast", "clipfast_compiled", "clipfast_graph", "clipfast_ds", "open_clip"}
    assert profile_step.group_of("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>") == \
        "elementwise / activation"


def test_compile_column_and_a_failing_compile_costs_only_its_column(tmp_path, monkeypatch):
    rows = tp.main(TINY + ["--sizes", "32", "--masks", "--no-open-clip", "--compile", "--out", str(tmp_path)])
    assert rows and all(r["clipfast_compiled_ms"] > 0 and r["clipfast_compiled_peak_mib"] > 0 for r in rows)
    assert "compiled ms" in (tmp_path / "throughput.md").read_text()

    import bench.steps as steps

    def broken(*a, **kw):
        model, opt, _ = steps.clipfast_step_fn(*a, **kw)

        def step(b):
            raise RuntimeError("inductor said no")
        return model, opt, step

    monkeypatch.setitem(steps.BUILDERS, "clipfast_compiled", broken)
    rows = tp.main(TINY + ["--sizes", "32", "--masks", "--no-open-clip", "--compile", "--out", str(tmp_path / "b")])
    assert rows and all("clipfast_compiled_ms" not in r and "inductor said no" in r["compiled_error"] for r in rows)
    assert all(r["clipfast_ms"] > 0 for r in rows)


@pytest.mark.parametrize("failure", ["raises", "nan", "build"])
def test_a_failing_kernels_column_costs_only_its_column(tmp_path, monkeypatch, failure):
    """The kernels column's builder raising (as out of memory would, with the other columns' models held), its step
    raising on its first call, or its loss turning non-finite in the warm-up: the column is left out with the error
    in the row; the plain column and the point stay."""
    import bench.steps as steps

    def broken(*a, **kw):
        if failure == "build":
            raise torch.OutOfMemoryError("triton said no: out of memory")
        model, opt, real = steps.clipfast_step_fn(*a, **kw)

        def step(b):
            if failure == "raises":
                raise RuntimeError("triton said no")
            return real(b) * float("nan")
        return model, opt, step

    monkeypatch.setitem(steps.BUILDERS, "clipfast_kernels", broken)
    rows = tp.main(TINY + ["--sizes", "32", "--masks", "--no-open-clip", "--kernels", "--warmup", "2",
                           "--out", str(tmp_path)])  # fmt: skip
    why = "non-finite loss" if failure == "nan" else "triton said no"
    assert rows and all("clipfast_kernels_ms" not in r and why in r["kernels_error"] for r in rows)
    assert all(r["clipfast_ms"] > 0 for r in rows)


def test_out_of_memory_while_timing_drops_the_last_optional_column(tmp_path, monkeypatch):
    """Every column built, then the interleaved timing runs out of memory (dab88c7: five L/16 columns on an 80 GB
    H100): the optional column built last is left out with the error in the row and the point is timed without it;
    with only required columns left, the error fails the point."""
    real, calls = tp.time_interleaved, []

    def oom_while_compiled(steps, *a, **kw):
        calls.append(sorted(steps))
        if "clipfast_compiled" in steps:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 148.00 MiB")
        return real(steps, *a, **kw)

    monkeypatch.setattr(tp, "time_interleaved", oom_while_compiled)
    rows = tp.main(TINY + ["--sizes", "32", "--masks", "--no-open-clip", "--kernels", "--compile",
                           "--out", str(tmp_path)])  # fmt: skip
    assert rows and all("clipfast_compiled_ms" not in r and "while timing" in r["compiled_error"] for r in rows)
    assert all(r["clipfast_ms"] > 0 and r["clipfast_kernels_ms"] > 0 and "kernels_error" not in r for r in rows)
    assert calls[:2] == [["clipfast", "clipfast_compiled", "clipfast_kernels"], ["clipfast", "clipfast_kernels"]]

    def always_oom(steps, *a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(tp, "time_interleaved", always_oom)
    with pytest.raises(SystemExit, match="no point was measured.*OutOfMemoryError"):  # every point failed: exit 1
        tp.main(TINY + ["--sizes", "32", "--masks", "--no-open-clip", "--out", str(tmp_path / "b")])
    assert not (tmp_path / "b" / "throughput.md").exists()  # nothing written: the failures are in the exit message


def test_points_measure_exactly_those_points_then_each_full_point(tmp_path):
    groups = points.parse_points(["B/16:112:16", "L/16:96:8:0.5", "B/16:96:8"])
    assert [(p.size, p.mask, p.text_len) for p in groups["ViT-B-16"]] == [(112, 0.0, 16), (96, 0.0, 8), (224, 0.0, 77)]
    assert [(p.size, p.mask, p.text_len) for p in groups["ViT-L-16"]] == [(96, 0.5, 8), (224, 0.0, 77)]
    assert list(points.parse_points(["B/16:224:77"])["ViT-B-16"]) == [points.Point("ViT-B-16", 224, 0.0, 77)]  # once
    for bad, why in (("B/16:112", "PRESET:SIZE:TEXT"), ("Z/99:112:16", "unknown model preset"),
                     ("B/16:112:16:1.5", "mask"), ("B/16:big:16", "invalid literal"),
                     ("RN50:224:16:0.5", "RN50 is a ResNet: it takes no patch mask")):
        with pytest.raises(SystemExit, match=why):
            points.parse_points([bad])
    rows = tp.main(TINY_RUN + ["--points", "demo:16:8:0.5", "--no-open-clip", "--out", str(tmp_path)])
    assert sorted((r["image_px"], r["mask"], r["text_len"]) for r in rows) == [(16, 0.5, 8), (32, 0.0, 16)]
    masked, full = sorted(rows, key=lambda r: r["mask"], reverse=True)  # the full point, measured last, still counts:
    assert full["clipfast_speedup"] == 1.0
    assert masked["clipfast_speedup"] == round(masked["clipfast_samples_s"] / full["clipfast_samples_s"], 3)


def test_arguments_no_point_can_run_with_are_usage_errors(capsys):
    """They used to fail at every point (exit status 0), or be replaced silently (--batch 0: the grid's 128)."""
    for bad, why in ((["--steps", "0"], "--steps 0 (at least 1)"), (["--batch", "0"], "--batch 0 (at least 1)"),
                     (["--text-lens", "1"], "--text-lens 1 (at least 2)"), (["--masks", "-0.5"], "--masks -0.5"),
                     (["--threads", "0"], "--threads 0"), (["--presets", "nope"], "unknown model preset 'nope'"),
                     (["--data", "/nonexistent"], "--data: no .tar shards")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            tp.parse_args(["--presets", "demo", *bad])
        assert e.value.code == 2 and why in capsys.readouterr().err, bad
    assert tp.parse_args(["--presets", "demo", "--batch", "4", "--masks", "0", "0.5"]).batch == 4


def test_skip_leaves_out_optional_columns(tmp_path):
    rows = tp.main(TINY_RUN + ["--points", "demo:16:8", "--no-open-clip", "--kernels", "--compile", "--skip",
                           "clipfast_kernels", "--out", str(tmp_path)])
    assert rows and all(r["clipfast_compiled_ms"] > 0 and "clipfast_kernels_ms" not in r for r in rows)
    with pytest.raises(SystemExit):
        tp.parse_args(TINY + ["--skip", "clipfast"])  # the plain column is the one every ratio needs


def test_a_run_of_single_points_is_drawn_as_bars_and_replots_from_its_json(tmp_path, monkeypatch):
    """No line has two points (a --points run): grouped bars per point, one per measured column, each labelled with its
    ratio to open_clip; a grid draws lines. report.replot redraws a folder's throughput.png from its throughput.json."""
    import json

    def row(preset, px, tokens, **cols):
        return dict(preset=preset, image_px=px, mask=0.0, image_tokens=tokens, text_len=16, batch=8,
                    **{f"{k}_samples_s": v for k, v in cols.items()})

    points = [row("B", 112, 49, clipfast=300.0, open_clip=150.0, clipfast_graph_kernels=330.0),
              row("L", 96, 36, clipfast=100.0, open_clip=80.0)]
    drawn = {}
    monkeypatch.setattr(report, "plot_points", lambda rows, path, title: drawn.setdefault("bars", (rows, title)))
    report.plot(points, tmp_path / "a.png", "points")
    assert drawn["bars"] == (points, "points")
    grid = points + [row("B", 224, 196, clipfast=90.0, open_clip=50.0)]
    report.plot(grid, tmp_path / "b.png", "grid")  # two B/16 points at text 16: a line, not bars
    assert drawn["bars"][1] == "points" and (tmp_path / "b.png").stat().st_size > 0
    monkeypatch.undo()
    (tmp_path / "throughput.json").write_text(json.dumps(dict(meta=dict(device="dev", date="d", commit="c"),
                                                              rows=points)))
    labels = []
    import matplotlib.axes

    real_text = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda ax, x, y, s, **kw: labels.append(s) or
                        real_text(ax, x, y, s, **kw))
    assert report.replot(tmp_path) == tmp_path / "throughput.png" and (tmp_path / "throughput.png").stat().st_size
    assert sorted(labels) == ["1.25×", "2.00×", "2.20×"]  # clipfast and graphs+kernels over open_clip, each point


def test_ab_table_puts_the_variants_side_by_side(tmp_path):
    """report.ab_table (gpu_suite.sh's A/B runs): a row per folder with its knobs, per point the graphs+kernels ms,
    MFU, the change against the first folder and the ratio to open_clip's ms from another folder of the same points."""
    def run(name, knobs, ms, with_open_clip=False):
        rows = [dict(preset=p, image_px=px, mask=0.0, text_len=t, clipfast_graph_kernels_ms=m,
                     clipfast_graph_kernels_iqr_ms=0.5, clipfast_graph_kernels_mfu=0.4,
                     **({"open_clip_ms": 150.0} if with_open_clip else {}))
                for (p, px, t), m in zip([("ViT-B-16", 112, 16), ("ViT-L-16", 96, 8)], ms)]
        (tmp_path / name).mkdir()
        meta = {"knobs": knobs} if knobs is not None else {}
        (tmp_path / name / "throughput.json").write_text(json.dumps({"meta": meta, "rows": rows}))
        return tmp_path / name

    base = run("kernels_ab1", {}, [60.0, 75.0])
    off = run("kernels_ab2", {"graph.OVERLAP_OPTIMIZER": 0}, [63.0, None])
    old = run("kernels_ab3", None, [66.0, 80.0])  # a run from before knobs were recorded
    ref = run("kernels", {}, [67.0, 79.0], with_open_clip=True)
    md = report.ab_table([base, off, old], open_clip=ref)
    lines = md.splitlines()
    assert lines[0] == "| variant | knobs | ViT-B-16 112 px / 16 | ViT-L-16 96 px / 8 |"
    assert lines[2] == ("| kernels_ab1 | defaults | 60.00 ms (0.50), MFU 0.400, 2.50x open_clip | "
                        "75.00 ms (0.50), MFU 0.400, 2.00x open_clip |")
    assert lines[3].startswith("| kernels_ab2 | graph.OVERLAP_OPTIMIZER=0 | 63.00 ms (0.50), MFU 0.400, +5.0%, ")
    assert lines[3].endswith(" | – |")  # the point that variant did not reach
    assert "| kernels_ab3 | not recorded | 66.00 ms (0.50), MFU 0.400, +10.0%, 2.27x open_clip |" in md
    with pytest.raises(ValueError, match="no folders"):
        report.ab_table([])


def test_goal_verdict_takes_the_fastest_column_at_each_goal_point():
    """report.goals: issue 7's marks (2x open_clip, MFU 0.45, scaling efficiency 0.85) judged on the fastest clipfast
    column at each goal point, its scaling efficiency from its own full-token point; nothing without MFU (CPU)."""
    from clipfast.presets import from_name

    def row(preset, px, text, batch, **cols):
        return {"preset": preset, "image_px": px, "mask": 0.0, "text_len": text, "batch": batch, **cols}

    full = from_name("ViT-B-16")
    rows = [row("ViT-B-16", 112, 16, 1024, gflop_per_sample=1.0, clipfast_samples_s=11000, clipfast_ms=93.0,
                clipfast_mfu=0.32, clipfast_graph_kernels_samples_s=16000, clipfast_graph_kernels_ms=64.0,
                clipfast_graph_kernels_mfu=0.46, open_clip_samples_s=7000),
            row("ViT-B-16", full.vision.image_size, full.text.context_length, 256, gflop_per_sample=3.8,
                clipfast_samples_s=2900, clipfast_graph_kernels_samples_s=3900, open_clip_samples_s=1800),
            row("ViT-L-16", 96, 8, 512, gflop_per_sample=1.0, clipfast_samples_s=6500, clipfast_ms=78.8,
                clipfast_mfu=0.44, clipfast_graph_kernels_samples_s=6400, clipfast_graph_kernels_mfu=0.43,
                open_clip_samples_s=3300),
            row("ViT-L-16", 112, 8, 512, gflop_per_sample=0.9, clipfast_samples_s=9000, clipfast_mfu=0.9,
                open_clip_samples_s=1000)]  # not a goal point
    report.add_scaling(rows)
    text = report.goals(rows)
    lines = [ln for ln in text.splitlines() if ln.startswith("| ViT")]
    assert len(lines) == 2
    assert "CUDA graphs + kernels | 64.0 | 2.29x (met) | 0.460 (met) | 1.08 (met)" in lines[0]  # 16000/3900/3.8
    assert "| clipfast | 78.8 | 1.97x (**not met**) | 0.440 (**not met**) | – (no full-token point)" in lines[1]
    assert not any("112 px / 8" in ln for ln in lines)
    for r in rows:
        for key in ("clipfast_mfu", "clipfast_graph_kernels_mfu"):
            r.pop(key, None)
    assert report.goals(rows) == ""


def test_goal_verdict_never_prints_a_miss_as_the_mark():
    """A miss rounding to the mark gets the digits that show it (0.4495 printed as 0.450 beside "not met", 0.85 and
    2.00x likewise); a full-token point without the goal column is said as such, not as no full-token point."""
    from clipfast.presets import from_name

    full = from_name("ViT-L-16")
    rows = [{"preset": "ViT-B-16", "image_px": 112, "mask": 0.0, "text_len": 16, "batch": 1024, "open_clip_ms": 153.6,
             "open_clip_samples_s": 1000.0, "clipfast_graph_kernels_samples_s": 1999.6,
             "clipfast_graph_kernels_ms": 65.8, "clipfast_graph_kernels_mfu": 0.4495,
             "clipfast_graph_kernels_scaling_eff": 0.8496},
            {"preset": "ViT-L-16", "image_px": 96, "mask": 0.0, "text_len": 8, "batch": 512,
             "open_clip_samples_s": 3000.0, "clipfast_graph_kernels_samples_s": 6600.0,
             "clipfast_graph_kernels_ms": 77.2, "clipfast_graph_kernels_mfu": 0.479},
            {"preset": "ViT-L-16", "image_px": full.vision.image_size, "mask": 0.0,
             "text_len": full.text.context_length, "batch": 128, "open_clip_samples_s": 650.0,
             "clipfast_samples_s": 950.0}]
    lines = [ln for ln in report.goals(rows).splitlines() if ln.startswith("| ViT")]
    assert "| 1.9996x (**not met**) | 0.4495 (**not met**) | 0.8496 (**not met**) |" in lines[0]
    assert lines[1].endswith("| 2.20x (met) | 0.479 (met) | – (no CUDA graphs + kernels column at the full-token "
                             "point) |")



def test_gpu_suite_budgets_its_grids_by_the_cut_timeout_and_keeps_runs_apart(tmp_path):
    """bench/gpu_suite.sh on the CPU, one tiny grid: the grid's --time-budget is 30 s under (or two thirds of) the
    timeout the suite actually applies, which its budget cuts (it was computed from the uncut one, so a cut grid was
    killed mid-point); a second run into the same folder moves the first aside instead of summarising its parts as
    its own."""
    import os
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "results"
    env = dict(os.environ, RESULTS_DIR=str(out), PYTHON=sys.executable, COMMIT="first", SUITE_BUDGET="75", T_ENV="0",
               T_TESTS="0", T_BENCH="0", T_CLIPA="0", T_KERNELS="0", T_PROFILE="0", T_GRID="300",
               GRID_ARGS="--presets demo --sizes 16 --masks --text-lens 8 --batch 2 --steps 1 --warmup 1 "
                         "--batches 1 --device cpu --no-open-clip")
    env.pop("OUT", None)
    r = subprocess.run(["bash", "bench/gpu_suite.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    log = (out / "suite.log").read_text()
    limit, budget = re.search(r"=== throughput \(timeout (\d+)s\): .*--time-budget (\d+)", log).groups()
    assert int(limit) < 300 and int(budget) == (int(limit) - 30 if int(limit) > 45 else int(limit) * 2 // 3), log
    assert (out / "throughput.json").exists() and "commit first" in (out / "summary.md").read_text()
    env.update(COMMIT="second", T_GRID="0")
    r = subprocess.run(["bash", "bench/gpu_suite.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    earlier = [p for p in tmp_path.iterdir() if p.name.startswith("results.before-")]
    assert len(earlier) == 1 and (earlier[0] / "throughput.json").exists()
    summary = (out / "summary.md").read_text()
    assert "commit second" in summary and "## Grid" not in summary and not (out / "throughput.json").exists()


def test_a_run_that_measures_nothing_leaves_earlier_results_alone(tmp_path, monkeypatch, capsys):
    """Every point failing (or none fitting the time budget) is a failed run that writes nothing: the earlier run's
    tables and plot in --out stay (they were replaced by an empty table beside the old plot, and --update-readme wrote
    that into the README)."""
    out = tmp_path / "out"
    out.mkdir()
    for ext in ("md", "csv", "json", "png"):
        (out / f"throughput.{ext}").write_text(f"earlier {ext}")

    def fail(*a, **k):
        raise RuntimeError("no luck")

    monkeypatch.setattr(tp, "measure", fail)
    monkeypatch.setattr(tp, "update_readme", lambda *a: pytest.fail("README touched"))
    with pytest.raises(SystemExit, match="no point was measured, nothing written"):
        tp.main([*TINY, "--no-open-clip", "--out", str(out), "--update-readme"])
    assert all((out / f"throughput.{e}").read_text() == f"earlier {e}" for e in ("md", "csv", "json", "png"))
    assert "holds an earlier run's results" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--knob", "foo=1"], "the switches are"),
    (["--knob", "layer_norm.BWD_STAGES=9"], "takes one of"),
    (["--time-budget", "-1"], "--time-budget -1"),
    (["--timer", "cpu", "--threads", "2"], "sums the threads"),
    (["--points", "demo:16:8", "--sizes", "32"], "--points takes the points whole: --sizes"),
    (["--points", "demo:16"], "--points: bad entry 'demo:16'"),
    (["--data", "data/demo/train", "--deepspeed"], "--deepspeed would be ignored"),
])
def test_bad_arguments_are_usage_errors(extra, message, capsys):
    """Values a run cannot use are argparse errors (exit status 2, before any folder or model), each naming itself:
    they were tracebacks, a silent no-op, or a run that timed the wrong thing."""
    with pytest.raises(SystemExit) as e:
        tp.parse_args(["--device", "cpu", *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_grid_within_one_decade_gets_readable_throughput_ticks(tmp_path, monkeypatch):
    """The log y axis labels 1, 2 and 5 of each decade: the CPU grid's 3-20 samples/s showed a single '10'."""
    import matplotlib.figure

    def row(px, tokens, text, sps):
        return dict(preset="ViT-S-16", image_px=px, mask=0.0, image_tokens=tokens, text_len=text, batch=8,
                    clipfast_samples_s=sps, open_clip_samples_s=sps * 0.8)

    saved = {}
    real = matplotlib.figure.Figure.savefig

    def keep(fig, path, **kw):
        fig.canvas.draw()
        saved["y"] = [t.get_text() for t in fig.axes[0].get_yticklabels() if t.get_text()]
        saved["title"] = fig.axes[0].get_title()
        return real(fig, path, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    long_title = "training throughput, CPU Intel(R) Xeon(R) Processor, 2 cores, 1 threads, 2026-11-27, commit cff2937"
    report.plot([row(64, 16, 8, 20.0), row(112, 49, 8, 11.0), row(224, 196, 77, 3.8)], tmp_path / "a.png", long_title)
    assert {"5", "10", "20"} <= set(saved["y"]), saved
    assert "\n" in saved["title"] and saved["title"].replace("\n", " ") == long_title  # wrapped, not cut
