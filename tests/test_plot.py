"""clipfast.plot: runs read back (resumed steps, staged runs, evals), series through stages, the PNG and the summary."""
import json

import pytest

from clipfast.plot import main, read_run, series, summary


def _run(folder, steps, batch, loss0=5.0, evals=None, extra_lines=()):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"batch_size": batch}))
    lines = [json.dumps({"step": s, "loss": loss0 - s / 100, "lr": 1e-3, "samples_per_s": 100.0 + s, "mfu": None})
             for s in steps]
    (folder / "metrics.jsonl").write_text("\n".join([*lines, *extra_lines]) + "\n")
    if evals:
        (folder / "evals.jsonl").write_text("\n".join(json.dumps(e) for e in evals) + "\n")


def test_a_resumed_run_keeps_the_last_line_of_each_step_and_skips_a_cut_line(tmp_path, capsys):
    # logged to step 30, resumed from the step-20 checkpoint: 30 logged again (loss 9), and a line cut by a crash
    _run(tmp_path / "a", [10, 20, 30], 64, extra_lines=[json.dumps({"step": 30, "loss": 9.0, "lr": 0, "mfu": None,
                                                                     "samples_per_s": 1}), '{"step": 40, "lo'])
    stages = read_run(tmp_path / "a")
    assert [r["step"] for r in stages[0]["metrics"]] == [10, 20, 30]
    assert series(stages, "metrics", "loss")[1] == [4.9, 4.8, 9.0]
    assert "metrics.jsonl:5 is not JSON" in capsys.readouterr().out


def test_stages_run_on_one_axis_with_their_starts(tmp_path):
    run = tmp_path / "clipa"
    _run(run / "pretrain", [10, 20], 128)
    _run(run / "finetune", [5, 10], 32, evals=[{"step": 10, "zeroshot": {"top1": 0.75}}])
    (run / "stages.json").write_text(json.dumps([{"stage": "pretrain"}, {"stage": "finetune"}]))
    stages = read_run(run)
    xs, ys, starts = series(stages, "metrics", "loss")
    assert xs == [10, 20, 25, 30] and starts == [(0, "pretrain"), (20, "finetune")]
    xs, _, starts = series(stages, "metrics", "loss", x="samples")
    assert xs == [1280, 2560, 2560 + 160, 2560 + 320] and starts[1] == (2560, "finetune")
    assert series(stages, "evals", "zeroshot/top1") == ([30], [0.75], starts[:1] + [(20, "finetune")])
    assert summary("clipa", stages) == ("clipa: 30 steps, final loss 4.9000, median 110 samples/s, "
                                        "zero-shot top-1 75.00%")


def test_the_png_has_a_panel_per_value_the_runs_hold(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _run(tmp_path / "a", [10, 20], 64, evals=[{"step": 20, "zeroshot": {"top1": 0.5},
                                                "retrieval": {"mean_recall": 0.25}}])
    _run(tmp_path / "b", [10, 20], 32)
    (tmp_path / "b" / "eval.json").write_text(json.dumps({"step": 20, "top1": 0.4, "top5": 0.9}))  # an older run
    out = main([str(tmp_path / "a"), str(tmp_path / "b"), "--x", "samples", "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert f"wrote {out} (training loss, zero-shot top-1, retrieval mean recall, learning rate, samples/s)" in printed
    assert "b: 20 steps, final loss 4.8000, median 115 samples/s, zero-shot top-1 40.00%" in printed
    main([str(tmp_path / "b")])  # default: curves.png in the run's folder; no retrieval, no MFU panel
    assert (tmp_path / "b" / "curves.png").is_file()
    assert "(training loss, zero-shot top-1, learning rate, samples/s)" in capsys.readouterr().out


def test_a_panel_per_evaluation_set(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _run(tmp_path / "a", [10, 20], 64, evals=[{"step": 20, "zeroshot:in1k": {"top1": 0.5, "top5": 0.8},
                                                "zeroshot:c10": {"top1": 0.9}, "retrieval:coco": {"mean_recall": 0.3}}])
    main([str(tmp_path / "a"), "--out", str(tmp_path / "c.png")])
    printed = capsys.readouterr().out
    assert ("(training loss, zero-shot top-1, in1k, zero-shot top-1, c10, retrieval mean recall, coco, learning rate, "
            "samples/s)") in printed
    assert "zero-shot top-1, c10 90.00%, retrieval mean recall, coco 30.00%" in printed


def test_a_folder_that_is_not_a_run_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="not a clipfast run"):
        read_run(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no run folder"):
        read_run(tmp_path / "missing")


def test_a_staged_run_not_finished_and_a_run_not_logged_yet(tmp_path, capsys):
    """A staged run writes stages.json when its last stage ends: before that (running, or stopped by a signal) the
    stages begun so far, in the config's order; a run with an empty metrics.jsonl is named, not a matplotlib error;
    a config.json that does not parse is named."""
    run = tmp_path / "clipa"
    _run(run / "pretrain", [10, 20], 128)
    (run / "config.json").write_text(json.dumps({"stages": [{"name": "pretrain"}, {"steps": 5}]}))  # 2nd: "stage1"
    stages = read_run(run)
    assert [st["name"] for st in stages] == ["pretrain"]
    _run(run / "stage1", [5], 32)
    assert [st["name"] for st in read_run(run)] == ["pretrain", "stage1"]
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="nothing to draw yet"):
        main([str(tmp_path / "fresh")])
    (run / "pretrain" / "config.json").write_text('{"batch_si')
    with pytest.raises(SystemExit):
        main([str(run)])
    assert "pretrain/config.json does not parse" in capsys.readouterr().err


def test_a_run_resumed_after_a_cut_line_logs_on_a_line_of_its_own(tmp_path, capsys):
    """A crash mid-write leaves metrics.jsonl without its last newline; the resumed run (from step 20) ends that line
    before appending (clipfast.train.end_cut_line), so its step 30 is read and wins over the run before's (without
    it the record was glued to the fragment and lost, and the older step 30 won)."""
    from clipfast.train import end_cut_line

    run = tmp_path / "a"
    _run(run, [10, 20, 30], 64)
    path = run / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 40, "lo')  # killed writing step 40
    for _ in range(2):  # (a second call, on a line already ended, adds nothing)
        end_cut_line(path)
    with open(path, "a") as f:
        for s, loss in ((30, 9.0), (40, 8.0)):
            f.write(json.dumps({"step": s, "loss": loss, "lr": 0, "mfu": None, "samples_per_s": 1}) + "\n")
    steps, losses = series(read_run(run), "metrics", "loss")[:2]
    assert steps == [10, 20, 30, 40] and losses == [4.9, 4.8, 9.0, 8.0]
    assert "metrics.jsonl:4 is not JSON" in capsys.readouterr().out  # the fragment alone, named
    assert path.read_text().count("\n") == 6
    end_cut_line(tmp_path / "none.jsonl")  # no file, or an empty one: nothing to end
    (tmp_path / "empty.jsonl").write_text("")
    end_cut_line(tmp_path / "empty.jsonl")
    assert (tmp_path / "empty.jsonl").read_text() == ""
