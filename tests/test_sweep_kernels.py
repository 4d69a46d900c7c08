"""bench/sweep_kernels.py: the launch-config sweep's harness, run on tiny shapes under the interpreter."""
import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def test_smoke_sweep_checks_and_times_every_config_and_marks_the_default(tmp_path):
    from bench import sweep_kernels as sk
    from bench import sweeps

    results = sk.main(["--smoke", "--out", str(tmp_path)])
    kernels = results["smoke"]
    # add+LN, attention and the fused MLP forward and backward, GELU backward, AdamW, three partial-sum finishes, two
    # column sums
    assert len(kernels) == 13
    for name, rows in kernels.items():
        assert sum(bool(r.get("default")) for r in rows) == 1, name  # the default is always among the candidates
        assert sum(bool(r.get("torch")) for r in rows) == (2 if name.startswith("AdamW") else 1), name
        assert all(r["ms"] is not None and "error" not in r for r in rows), (name, rows)
    import sys

    ln, ge = sys.modules["kernels.layer_norm"], sys.modules["kernels.gelu"]
    marked = {name: next(r["config"] for r in rows if r.get("default")) for name, rows in kernels.items()}
    bwd, gelu = ln._bwd_config(sweeps.SMOKE["smoke"]["width"]), ge._config()
    # "default" is what the kernel runs today: the launchers' own configs; the layer norm's 4 programs per SM and, for
    # the smoke shape's 2 tiles a program, no pipeline (BWD_STAGES=0 chooses); the GELU's programs per SM
    assert marked["add_layer_norm backward"] == (f"BLOCK_M={bwd['BLOCK_M']} warps={bwd['num_warps']} programs/SM=4 "
                                                 "stages=1")
    assert marked["GELU backward + bias grad"] == (f"BLOCK_M={gelu['BLOCK_M']} BLOCK_N={gelu['BLOCK_N']} "
                                                   f"warps={gelu['num_warps']} programs/SM={ge.PROGRAMS_PER_SM} "
                                                   f"stages={ge.BWD_STAGES}")
    finishes = [name for name in kernels if name.startswith("finish ")]
    assert len(finishes) == 3 and all(marked[f].endswith("warps=4") for f in finishes)
    lin = sys.modules["kernels.linear"]
    sums = [name for name in kernels if name.startswith("column sums, ")]
    assert len(sums) == 2 and all(marked[f] == f"BLOCK_M={lin.BLOCK_M} BLOCK_N={lin.BLOCK_N} warps={lin.NUM_WARPS} "
                                  f"programs/SM={lin.PROGRAMS_PER_SM}" for f in sums)
    md = (tmp_path / "sweep.md").read_text()
    assert "(default)" in md and "**torch: add + F.layer_norm**" in md
    assert "--smoke: one run of each config in Triton's interpreter" in md and "CUDA events" not in md
    assert (tmp_path / "sweep.json").exists()


def test_a_config_whose_outputs_differ_is_reported_wrong_not_timed():
    from bench import sweeps

    timed = []
    row = sweeps._measure("x", (lambda: None, lambda: "dx: max |diff| 1 > 0.1"), lambda fn: timed.append(fn) or 1.0,
                      False)  # fmt: skip
    assert row["ms"] is None and row["error"].startswith("WRONG dx") and not timed
    import torch

    assert sweeps._close(torch.ones(4), torch.ones(4), "y") is None
    assert "y: max |diff|" in sweeps._close(torch.ones(4) * 1.1, torch.ones(4), "y")


def test_smoke_without_the_interpreter_says_to_set_it(monkeypatch):
    """Without a GPU the smoke run needs TRITON_INTERPRET=1: said as such (it was Triton's '0 active drivers')."""
    from bench import sweep_kernels as sk

    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(SystemExit, match="set TRITON_INTERPRET=1"):
        sk.main(["--smoke"])
