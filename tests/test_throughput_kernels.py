"""bench/throughput.py's opt-in kernels: the kernels and graphs+kernels columns, the --clipfast-* kernel flags and
the --knob switches, on the tiny `demo` preset (the kernels under the Triton interpreter)."""
import json

import pytest
import torch

from bench import points, report, steps
from bench import throughput as tp
from tests.test_throughput import TINY_RUN


def test_kernels_column_runs_the_opt_in_kernels_beside_plain_clipfast(tmp_path, monkeypatch):
    """--kernels: a second clipfast column whose model runs kernels.layer_norm, kernels.short_attention and
    kernels.linear_gelu (under the interpreter here), timed in the same run as the plain column (whose model keeps
    torch's ops), with their ratio in the row, the table and the summary."""
    import bench.steps as steps
    import kernels.short_attention as sa
    from clipfast.layers import MLP, Attention, LayerNorm

    built, calls = [], []
    real, real_apply = steps._clipfast_model, sa.ShortAttentionQKVFn.apply
    monkeypatch.setattr(steps, "_clipfast_model", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    monkeypatch.setattr(sa.ShortAttentionQKVFn, "apply", lambda *a: calls.append(1) or real_apply(*a))
    rows = tp.main(TINY_RUN + ["--points", "demo:16:8", "--no-open-clip", "--kernels", "--out", str(tmp_path)])
    assert len(built) == 2 * len(rows) and calls  # plain + kernels per point; the kernel ran
    plain, kern = built[:2]
    assert {m.impl for m in plain.modules() if isinstance(m, LayerNorm)} == {"torch"}
    assert {m.impl for m in kern.modules() if isinstance(m, LayerNorm)} == {"triton"}
    assert {m.dense_impl for m in kern.visual.modules() if isinstance(m, Attention)} == {"triton"}
    assert {m.impl for m in kern.modules() if isinstance(m, MLP)} == {"triton"}
    assert {m.impl for m in plain.modules() if isinstance(m, MLP)} == {"torch"}
    for r in rows:
        assert r["kernels_vs_clipfast"] == round(r["clipfast_kernels_samples_s"] / r["clipfast_samples_s"], 3)
    md = (tmp_path / "throughput.md").read_text()
    assert "kernels / clipfast" in md
    assert "With the opt-in kernels" in md


@pytest.mark.parametrize("flag,value,attr,module,header", [
    ("--clipfast-layer-norm", "triton", "impl", "LayerNorm", "clipfast layer norm triton"),
    ("--clipfast-vision-attention", "triton", "dense_impl", "Attention", "clipfast vision attention triton"),
])  # fmt: skip
def test_clipfast_kernel_flag_reaches_every_clipfast_model(tmp_path, monkeypatch, flag, value, attr, module, header):
    """--clipfast-layer-norm / --clipfast-vision-attention triton: the clipfast columns' models run the kernel (under
    the interpreter here; the vision attention in the image tower only), and the run's header says so."""
    import bench.steps as steps
    import clipfast.layers as cm

    built = []
    real = steps._clipfast_model
    monkeypatch.setattr(steps, "_clipfast_model", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    for name in ("LAYER_NORM", "VISION_ATTENTION"):  # restored after the test: tp.main sets them for the run
        monkeypatch.setattr(steps, name, getattr(steps, name))
    rows = tp.main(TINY_RUN + ["--points", "demo:16:8", "--no-open-clip", flag, value, "--out", str(tmp_path)])
    assert rows and built
    cls = getattr(cm, module)
    for model in built:
        where = model.visual if module == "Attention" else model
        mods = [m for m in where.modules() if isinstance(m, cls)]
        assert mods and all(getattr(m, attr) == value for m in mods)
    meta = json.loads((tmp_path / "throughput.json").read_text())["meta"]
    assert header in meta["precision"]
    with pytest.raises(SystemExit):
        tp.parse_args([flag, "apex"])


def test_graph_kernels_column_builds_the_graphed_step_with_every_kernel_and_reports_both_ratios(monkeypatch):
    """graphs+kernels (CUDA only, so its builder is checked here with a stand-in for GraphedTrainStep): the graphed
    model runs every opt-in kernel while the plain graphs column's keeps torch's ops; the report gives graphs+kernels
    against open_clip (bold) and against the plain graphs, in the table and the summary."""
    from clipfast.layers import MLP, Attention, LayerNorm
    from clipfast.presets import from_name

    graphed = []

    class FakeGraphed:
        def __init__(self, model, opt, **kw):
            graphed.append(model)
            assert all(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups)  # as the trainer's graphed step

    monkeypatch.setattr(steps, "GraphedTrainStep", FakeGraphed)
    cfg, pt = from_name("demo"), points.Point("demo", 16, 0.0, 8)
    steps.BUILDERS["clipfast_graph"](cfg, pt, torch.device("cpu"), "fp32", 4)
    steps.BUILDERS["clipfast_graph_kernels"](cfg, pt, torch.device("cpu"), "fp32", 4)
    plain, kern = graphed
    assert {m.impl for m in plain.modules() if isinstance(m, (LayerNorm, MLP))} == {"torch"}
    assert {m.impl for m in kern.modules() if isinstance(m, (LayerNorm, MLP))} == {"triton"}
    assert {m.dense_impl for m in kern.visual.modules() if isinstance(m, Attention)} == {"triton"}

    row = dict(preset="demo", image_px=16, mask=0.0, image_tokens=1, text_len=8, text_tokens=6.0, pad_frac=0.25,
               batch=4, gflop_per_sample=1.0, clipfast_ms=10.0, clipfast_wall_ms=10.0, clipfast_samples_s=400.0,
               clipfast_graph_samples_s=500.0, clipfast_graph_kernels_samples_s=600.0,
               clipfast_graph_kernels_ms=6.7, open_clip_samples_s=250.0)
    report.add_scaling([row])
    assert row["graph_kernels_vs_open_clip"] == 2.4 and row["graph_kernels_vs_graph"] == 1.2
    md = report.markdown_table([row])
    assert "graphs+kernels / graphs" in md and "**2.40×**" in md
    text = report.summary([row])
    assert "CUDA graphs with the opt-in kernels / open_clip: min 2.40×" in text
    assert "As CUDA graphs, with the kernels / without: min 1.20×" in text


def test_knobs_set_kernel_switches_and_reject_unknown_ones(monkeypatch):
    """--knob module.NAME=value sets the kernels' switch (the value their code reads at the next launch); a switch or
    value outside bench/steps.py's KNOBS is an error that lists the valid ones."""
    import importlib

    from bench import steps

    for key in steps.KNOBS:  # restored after the test
        module, name = steps.knob_module(key), key.split(".")[1]
        monkeypatch.setattr(module, name, getattr(module, name))
    got = steps.set_knobs(["short_attention.FWD_HEADS=2", "adamw.SLOTS=1", "_common.FINISH=torch",
                           "model.TEXT_STREAM_PRIORITY=-1", "graph.OVERLAP_OPTIMIZER=0", "layer_norm.BWD_STAGES=2",
                           "gelu.BWD_STAGES=3"])
    assert got == {"short_attention.FWD_HEADS": 2, "adamw.SLOTS": 1, "_common.FINISH": "torch",
                   "model.TEXT_STREAM_PRIORITY": -1, "graph.OVERLAP_OPTIMIZER": 0, "layer_norm.BWD_STAGES": 2,
                   "gelu.BWD_STAGES": 3}
    assert importlib.import_module("kernels.layer_norm").BWD_STAGES == 2
    assert importlib.import_module("kernels.gelu").BWD_STAGES == 3
    assert importlib.import_module("clipfast.graph").OVERLAP_OPTIMIZER == 0
    assert importlib.import_module("clipfast.model").TEXT_STREAM_PRIORITY == -1
    assert importlib.import_module("kernels.short_attention").FWD_HEADS == 2
    assert importlib.import_module("kernels.adamw").SLOTS == 1
    assert importlib.import_module("kernels._common").FINISH == "torch"
    with pytest.raises(ValueError, match=r"the switches are \['_common.FINISH', 'adamw.SLOTS'"):
        steps.set_knobs(["adamw.SLOT=1"])
    with pytest.raises(ValueError, match=r"adamw.SLOTS takes one of \('1', '2'"):
        steps.set_knobs(["adamw.SLOTS=9"])
