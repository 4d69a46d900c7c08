"""Running on a cluster: ranks from SLURM (clipfast.launch), a scheduler's signal stopping the run with a checkpoint
and the same command resuming it (clipfast.checkpoint.Preemption), and old checkpoints pruned (keep_ckpts)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, requires_cuda

ROOT = Path(__file__).resolve().parents[1]



def test_slurm_env_sets_the_rank_variables_and_a_master_shared_by_the_step(tmp_path):
    from clipfast.launch import slurm_env

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    scontrol = bin_ / "scontrol"  # stands in for SLURM's: expands the node list, one host a line
    scontrol.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && [ \"$3\" = 'gpu[03-04]' ] && "
                        "printf 'gpu03\\ngpu04\\n'\n")
    scontrol.chmod(0o755)
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "6",
           "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[03-04]", "PATH": str(bin_)}
    line = slurm_env(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("5", "1", "6")  # the step's tasks, not the job's
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu03", str(20000 + 123456 % 20000))
    assert "rank 5 of 6" in line and "gpu03" in line
    for pairs in ([(123456, s) for s in range(64)],  # a job's steps; the first two steps of 1,300 jobs in a row
                  [(job, step) for job in range(123456, 123456 + 1300) for step in (0, 1)]):
        ports = set()
        for job, step in pairs:
            other = {**env, "SLURM_JOB_ID": str(job), "SLURM_STEP_ID": str(step)}
            for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
                del other[key]
            slurm_env(other)
            ports.add(other["MASTER_PORT"])
        assert len(ports) == len(pairs)  # no two alike
    # a batch script's own shell (as SLURM sets it, from an `env | grep SLURM` there): rank 0 of the job's 4 tasks,
    # but no step variables; `python clipfast/train.py` there is one rank, not one waiting for 3 more
    batch = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "4",
             "SLURM_JOB_ID": "200505", "SLURM_JOB_NODELIST": "gnode[10,20,25,37]", "PATH": str(bin_)}
    assert slurm_env(dict(batch)) is None

    kept = {"RANK": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}  # a launcher inside the allocation: its own wins
    assert slurm_env(kept) is None and kept == {"RANK": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}
    assert slurm_env({"PATH": str(bin_)}) is None  # not under SLURM
    one = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "PATH": str(bin_)}
    slurm_env(one)  # one task needs no master
    assert one["WORLD_SIZE"] == "1" and "MASTER_ADDR" not in one
    given = {**env, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500"}
    del given["RANK"], given["WORLD_SIZE"], given["LOCAL_RANK"]
    slurm_env(given)
    assert (given["MASTER_ADDR"], given["MASTER_PORT"]) == ("10.0.0.7", "29500")
    lost = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "gpu01", "PATH": str(tmp_path)}
    with pytest.raises(RuntimeError, match=r"MASTER_ADDR is not set.*gpu01.*scontrol is not on PATH"):
        slurm_env(lost)


def test_prune_keeps_the_newest_and_the_latest(tmp_path):
    from clipfast.checkpoint import prune

    for n in (5, 10, 15, 20, 100):
        (tmp_path / f"step{n}").mkdir()
    (tmp_path / "step20_universal").mkdir()  # not a checkpoint of its own
    (tmp_path / "zero_to_fp32.py").write_text("")
    (tmp_path / "latest").write_text("step20")  # e.g. step100 left by a run that was then resumed at 20
    gone = prune(tmp_path, 2)
    assert sorted(p.name for p in gone) == ["step10", "step15", "step5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step100", "step20", "step20_universal",
                                                         "zero_to_fp32.py"]
    (tmp_path / "latest").write_text("step100")
    assert [p.name for p in prune(tmp_path, 1)] == ["step20"]
    assert prune(tmp_path, 0) == []  # 0 keeps all


def test_preemption_notes_the_signal_and_restores_the_handlers():
    from clipfast.checkpoint import PREEMPT_SIGNALS, Preemption

    before = {name: signal.getsignal(getattr(signal, name)) for name in PREEMPT_SIGNALS}
    p = Preemption().install()
    try:
        assert not p.agreed(1, None)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)  # (handlers run between bytecodes of the main thread)
        assert p.signal == "SIGUSR1" and p.agreed(1, None)
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal is the one named
        time.sleep(0.1)
        assert p.signal == "SIGUSR1"
    finally:
        p.restore()
    assert {name: signal.getsignal(getattr(signal, name)) for name in PREEMPT_SIGNALS} == before


def _agree_rank(rank, port, out, backend="gloo", world=2):
    import torch
    import torch.distributed as dist

    from clipfast.checkpoint import Preemption

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    p = Preemption()
    decisions = []
    for step in range(1, 9):
        if rank == world - 1 and step == 3:
            p.signal = "SIGUSR1"  # (what the handler notes) on the last rank alone, during its step 3
        if device.type == "cuda":  # a step's work on the training stream, still running when the flag goes up
            x = torch.randn(2048, 2048, device=device)
            for _ in range(20):
                x = x @ x / 2048**0.5
        decisions.append(p.agreed(2, device))  # (2: the several-rank path, also where this group has one rank)
    p.reset()
    decisions.append(p.agreed(2, device))  # after a reset (a new stage) the count starts again
    (out / f"rank{rank}.json").write_text(json.dumps(decisions))
    dist.destroy_process_group()
    os._exit(0)  # past the interpreter's teardown, where a spawned gloo rank once aborted (SIGABRT, "terminate called
    # without an active exception") after its work was done: a crash of the harness, not of what is tested


def test_ranks_agree_to_stop_lag_steps_after_one_of_them_is_signalled(tmp_path):
    import torch.multiprocessing as mp

    from clipfast.checkpoint import Preemption

    mp.spawn(_agree_rank, args=(free_port(), tmp_path), nprocs=2)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    first = 3 + Preemption.LAG  # rank 1's flag from step 3, read LAG steps later
    assert got[0] == got[1] == [step >= first for step in range(1, 9)] + [False], got


@requires_cuda
def test_the_flags_side_stream_path_on_cuda(tmp_path):
    """The CUDA path (fill, NCCL all-reduce, copy to pinned memory on a side stream, read LAG steps later) decides as
    the CPU path does; one NCCL rank in a spawned process."""
    import torch.multiprocessing as mp

    from clipfast.checkpoint import Preemption

    mp.spawn(_agree_rank, args=(free_port(), tmp_path, "nccl", 1), nprocs=1)
    first = 3 + Preemption.LAG
    assert json.loads((tmp_path / "rank0.json").read_text()) == [s >= first for s in range(1, 9)] + [False]


def _metrics(out):
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _slurm_tasks(n, out, port, *overrides):
    """n processes started as `srun` starts them: no launcher, the rank in SLURM's variables only."""
    procs = []
    for r in range(n):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "SLURM_PROCID": str(r),
               "SLURM_LOCALID": str(r), "SLURM_NTASKS": str(n), "SLURM_STEP_NUM_TASKS": str(n), "SLURM_JOB_ID": "7",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE"):
            env.pop(key, None)
        cmd = [sys.executable, "clipfast/train.py", "--config", "configs/demo.py", f"out_dir={out}", *overrides]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def _finish(procs, timeout=600):
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return [p.returncode for p in procs], "\n".join(outs)


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_one_step_with_a_checkpoint_and_resume_goes_on(data, tmp_path):
    """Two ranks from SLURM's variables under DeepSpeed ZeRO-1; SIGUSR1 to rank 1 alone (a signal reaches ranks at
    different moments): both stop at the same step, save it and exit 75; the same command with resume=true goes on
    from that step to the end; keep_ckpts=2 leaves the newest two."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("nvidia.dali")
    from clipfast.checkpoint import PREEMPTED_EXIT

    out = tmp_path / "run"
    common = [f"train_data={data / 'train'}", "batch_size=16", "log_every=2", "ckpt_every=4", "keep_ckpts=2",
              "warmup_steps=2", "tensorboard=false", "data_threads=1", "eval_at_end=false"]
    procs = _slurm_tasks(2, out, free_port(), "steps=100000", *common)
    deadline = time.monotonic() + 300
    while len(_metrics(out)) < 3 and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    if len(_metrics(out)) < 3:  # (not trained past the first checkpoint, step 4)
        for p in procs:
            p.kill()
        pytest.fail("no 3 log lines in 300 s:\n" + _finish(procs)[1][-3000:])
    procs[1].send_signal(signal.SIGUSR1)
    codes, log = _finish(procs)
    assert codes == [PREEMPTED_EXIT] * 2, log[-3000:]
    stop = int((out / "ckpt" / "latest").read_text().strip().removeprefix("step"))
    assert 6 <= stop < 100000, stop
    assert f"a signal on another rank received: stopped at step {stop} of 100000" in log, log[-3000:]
    assert "rank 0 of 2 (local 0) from SLURM" in log
    assert (out / "ckpt" / f"step{stop}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    kept = sorted(p.name for p in (out / "ckpt").iterdir() if p.is_dir())
    assert kept == sorted({f"step{stop}", f"step{(stop - 1) // 4 * 4}"}), kept  # the newest two: keep_ckpts=2
    assert stop - 2 < _metrics(out)[-1]["step"] <= stop and not (out / "eval.json").exists()  # (log_every=2)

    end = stop + 4
    codes, log = _finish(_slurm_tasks(2, out, free_port(), f"steps={end}", "resume=true", *common))
    assert codes == [0, 0], log[-3000:]
    assert f"at step {stop}" in log
    steps = [m["step"] for m in _metrics(out)]
    resumed = [x for x in steps if x > stop]  # the resumed run's log lines: its even steps and its last
    assert resumed == [x for x in range(stop + 1, end + 1) if x % 2 == 0 or x == end] and steps == sorted(steps)
    assert (out / "ckpt" / "latest").read_text().strip() == f"step{end}"


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_at_the_next_step_and_the_resumed_run_makes_the_final_evaluation(data, tmp_path):
    """engine=torch on one rank checks every step, not only on log steps; the reader process (reader_process=on)
    ignores the signal its process group got; a stopped run makes no final evaluation, and the same command resumed
    at its last step makes it, with no step left to train."""
    pytest.importorskip("nvidia.dali")
    from clipfast.checkpoint import PREEMPTED_EXIT

    out = tmp_path / "run1"
    common = [f"train_data={data / 'train'}", f"val_data={data / 'val'}", f"out_dir={out}", "batch_size=16",
              "log_every=1000", "ckpt_every=1000", "warmup_steps=2", "tensorboard=false", "data_threads=1",
              "engine=torch", "reader_process=on"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        env.pop(key, None)
    cmd = [sys.executable, "clipfast/train.py", "--config", "configs/demo.py", "steps=100000", *common]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out / "config.json").is_file() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.2)
    time.sleep(3)  # into the loop (no log line to wait for: log_every=1000)
    os.killpg(p.pid, signal.SIGTERM)  # as a scheduler does: the trainer and its reader process
    log = p.communicate(timeout=600)[0]
    assert p.returncode == PREEMPTED_EXIT, log[-3000:]
    stop = int((out / "ckpt" / "latest").read_text().strip().removeprefix("step"))
    assert 0 < stop < 1000 and f"SIGTERM received: stopped at step {stop} of 100000" in log, log[-3000:]
    assert (out / "ckpt" / f"step{stop}" / "state.pt").is_file()
    assert not (out / "eval.json").exists()  # stopped early: no final evaluation

    r = subprocess.run([*cmd[:4], f"steps={stop}", "resume=true", *common], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert f"at step {stop}" in r.stdout + r.stderr
    ev = json.loads((out / "eval.json").read_text())
    assert ev["step"] == stop and ev["samples"] == 359
