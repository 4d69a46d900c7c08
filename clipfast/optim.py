"""bf16 weights with fp32 master copies: the precision clipfast trains in on a GPU, outside DeepSpeed.

DeepSpeed's bf16 mode (what `clipfast.train` runs on CUDA) keeps the model in bf16, so activations, norms and
matmuls are all bf16, and holds an fp32 master copy of the weights in the optimizer: each step casts the bf16
gradients to fp32, updates the masters, and copies them back into the bf16 weights. `MasterAdamW` does the
same for one device, so a benchmark or a CUDA-graph step (clipfast.graph) can run what the trainer runs; with
capturable=True its whole step can be captured. With fused_cast each parameter's cast, update and copy run as one
pass instead: on CUDA one Triton kernel launch (kernels.adamw; the default for the capturable, CUDA-graph step), on
the CPU one compiled pass (torch.compile of `_adamw_cast`; opt-in).
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch

log = logging.getLogger(__name__)

# MasterAdamW's step inside the backward (set_overlap) launches a param group's queued tensors once they number
# kernels.adamw.SLOTS or hold this many elements (a launch of 2,048 programs of 2,048 elements: the whole GPU busy)
FLUSH_NUMEL = 1 << 22


def _adamw_cast(p, g, w, m, v, hp):
    """One parameter's AdamW step in one pass: bf16 gradient g read as fp32, fp32 master w and moments m, v updated,
    the master rounded into the bf16 weight p. hp = (lr, weight decay, beta1, beta2, eps, 1 - beta1^t,
    sqrt(1 - beta2^t)) as a float32 tensor on the parameters' device: values, not constants, so that one compiled
    kernel serves every step and group. The same arithmetic as torch.optim.AdamW's."""
    lr, wd, b1, b2, eps, bc1, bc2_sqrt = hp.unbind()
    g = g.float()
    w.mul_(1 - lr * wd)
    m.lerp_(g, 1 - b1)
    v.mul_(b2).add_(g * g * (1 - b2))
    w.sub_(m / (v.sqrt() / bc2_sqrt + eps) * (lr / bc1))
    p.copy_(w)


_COMPILED_STEP = None


def _compiled_adamw_cast():
    """_adamw_cast through torch.compile (one kernel per parameter, dynamic in its size: compiled once, in seconds),
    or eager where compiling is not possible (no C++ compiler, ...), with a warning."""
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        _COMPILED_STEP = torch.compile(torch.no_grad()(_adamw_cast), dynamic=True)
    return _COMPILED_STEP


class _FusedCastAdamW(torch.optim.AdamW):
    """torch.optim.AdamW over the fp32 masters whose step() reads each master's gradient straight from its bf16
    parameter and writes the bf16 parameter back, in one pass (_adamw_cast). Being an AdamW, its state, param
    groups, state_dict, step hooks and LR schedulers behave as torch's."""

    def __init__(self, groups, param_of: dict, triton: bool = False, **kw):
        super().__init__(groups, **kw)
        self._param_of = param_of  # id(master) -> bf16 parameter
        self.triton = triton  # kernels.adamw (MasterAdamW decides), else the compiled CPU pass
        self.grad_scale = None  # a device tensor the gradients are divided by (clipped_step), Triton path only
        # the step inside the backward (MasterAdamW.set_overlap / begin_step), Triton path only
        self._where = {id(p): (gi, m) for gi, g in enumerate(self.param_groups) for m in g["params"]
                       for p in (param_of[id(m)],)}  # id(bf16 parameter) -> (group index, master)
        self._hooks = []  # post-accumulate-grad hook handles while overlap is on
        self._armed = False  # a begin_step() whose step() has not come yet
        self._pending: dict[int, list] = {}  # group index -> masters whose gradients are complete, not yet launched
        self._streams: dict[int, list] = {}  # group index -> the streams those gradients were made on (CUDA)
        self._done: set[int] = set()  # id(master) of those launched during this backward
        self._stream = None  # CUDA: the stream the in-backward launches run on
        self._forked = False  # work went to that stream in this backward (step() joins it then, and only then)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterAdamW(fused_cast=True) takes no closure")
        if self.triton:
            self._finish_overlap()
            self._triton_step()
            self._done.clear()
            return None
        if self.grad_scale is not None:
            raise ValueError("MasterAdamW: the compiled CPU step does not take a grad_scale")
        kernel = _compiled_adamw_cast()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            hps = {}  # (step count, device) -> hyper-parameters: as a rule one tensor per group and step
            for m in group["params"]:
                p = self._param_of[id(m)]
                if p.grad is None:  # as torch's AdamW: no gradient, no step
                    continue
                st = self.state[m]
                if not st:  # torch.optim.AdamW's layout (a CPU step counter, as its non-capturable path keeps)
                    st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(m), exp_avg_sq=torch.zeros_like(m))
                st["step"] += 1
                t = float(st["step"])
                hp = hps.get((t, m.device))
                if hp is None:
                    hp = hps[t, m.device] = torch.tensor(
                        [group["lr"], group["weight_decay"], b1, b2, group["eps"], 1 - b1**t, math.sqrt(1 - b2**t)],
                        dtype=torch.float32, device=m.device)
                args = (p, p.grad, m, st["exp_avg"], st["exp_avg_sq"])
                if all(x.is_contiguous() for x in args):
                    args = tuple(x.view(-1) for x in args)  # one compiled kernel for every shape
                try:
                    kernel(*args, hp)
                except Exception as e:  # e.g. no C++ compiler for inductor: the same arithmetic, eagerly
                    global _COMPILED_STEP
                    log.warning("MasterAdamW: the compiled step failed (%s: %s); running it eagerly",
                                type(e).__name__, str(e)[:200])
                    _COMPILED_STEP = kernel = _adamw_cast
                    kernel(*args, hp)
        return None

    def _triton_step(self):
        """kernels.adamw: eight parameters per launch (kernels.adamw.SLOTS), every input a device tensor (step counts,
        lr, grad_scale), so the step can be captured in a CUDA graph; the step counts as torch's capturable AdamW
        keeps them. Parameters already stepped inside this backward (begin_step) are left out."""
        for group in self.param_groups:
            self._launch(group, self._todo(group, [m for m in group["params"] if id(m) not in self._done]))

    def _todo(self, group, masters) -> list:
        """(bf16 parameter, master, state) of those masters whose parameter has a gradient; state made on first use."""
        todo = []
        for m in masters:
            p = self._param_of[id(m)]
            if p.grad is None:
                continue
            st = self.state[m]
            if not st:
                st.update(step=torch.zeros((), dtype=torch.float32, device=m.device),
                          exp_avg=torch.zeros_like(m), exp_avg_sq=torch.zeros_like(m))
            elif st["step"].device != m.device or st["step"].dtype != torch.float32:  # a CPU count, loaded
                st["step"] = st["step"].to(device=m.device, dtype=torch.float32)
            todo.append((p, m, st))
        return todo

    def _launch(self, group, todo) -> None:
        from kernels.adamw import adamw_cast_multi_

        if not todo:
            return
        b1, b2 = group["betas"]
        torch._foreach_add_([st["step"] for _, _, st in todo], 1.0)
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor) or lr.device != todo[0][1].device:
            lr = torch.full((), float(lr), dtype=torch.float32, device=todo[0][1].device)
        adamw_cast_multi_([(p, p.grad, m, st["exp_avg"], st["exp_avg_sq"], st["step"]) for p, m, st in todo], lr,
                          weight_decay=group["weight_decay"], beta1=b1, beta2=b2, eps=group["eps"],
                          grad_scale=self.grad_scale, impl="triton")

    # the step inside the backward ---------------------------------------------------------------------------------

    def set_overlap(self, enable: bool) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if enable:
            self._hooks = [self._param_of[id(m)].register_post_accumulate_grad_hook(self._on_grad)
                           for g in self.param_groups for m in g["params"]]
        self._armed = False

    @property
    def overlap(self) -> bool:
        return bool(self._hooks)

    def begin_step(self) -> None:
        if self.grad_scale is not None:
            raise ValueError("MasterAdamW.begin_step: a grad_scale (clipping) needs every gradient before any update")
        self._armed, self._pending, self._streams, self._done, self._forked = True, {}, {}, set(), False
        dev = self.param_groups[0]["params"][0].device
        if dev.type == "cuda" and self._stream is None:
            self._stream = torch.cuda.Stream(dev)  # made here, outside any capture (a graph's first step is eager)

    @torch.no_grad()
    def _on_grad(self, p) -> None:
        """p's gradient is complete: queue its master; a group's queue is launched when it holds SLOTS tensors or
        FLUSH_NUMEL elements, on the optimizer's stream after the work so far on each stream a queued gradient was
        made on (the current stream in its hook: autograd's stream for that parameter)."""
        if not self._armed:
            return
        import kernels.adamw as ka

        gi, m = self._where[id(p)]
        queue = self._pending.setdefault(gi, [])
        queue.append(m)
        if self._stream is not None:  # each queued gradient's stream (the towers' come on streams of their own)
            here = torch.cuda.current_stream(self._stream.device)
            streams = self._streams.setdefault(gi, [])
            if all(here != s for s in streams):
                streams.append(here)
        if len(queue) < ka.SLOTS and sum(x.numel() for x in queue) < FLUSH_NUMEL:
            return
        del self._pending[gi]
        streams = self._streams.pop(gi, [])
        group = self.param_groups[gi]
        todo = self._todo(group, queue)  # (a state made here is zero-filled on the current stream, before the wait)
        self._done.update(id(x) for x in queue)
        if self._stream is None:
            self._launch(group, todo)
            return
        # every queued gradient's stream, not only this hook's: one made earlier on another stream may still be
        # running (waiting on this hook's alone gave non-finite losses on an H200 at bdf2175, B/16 with the text tower
        # on its own stream: updates read image-tower gradients not yet written)
        for s in streams:
            self._stream.wait_stream(s)
        self._forked = True
        with torch.cuda.stream(self._stream):
            self._launch(group, todo)

    def _finish_overlap(self) -> None:
        """At step(): the queued rest goes to _triton_step (on the current stream, after the optimizer stream)."""
        if not self._armed:
            return
        self._armed, self._pending, self._streams = False, {}, {}
        if self.grad_scale is not None:
            raise ValueError("MasterAdamW: a step that began inside the backward (begin_step) cannot be clipped: "
                             "parameters were updated before the global gradient norm was known")
        if self._forked:  # (in a CUDA graph capture, waiting on a stream outside it would be an error)
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
            self._forked = False


class MasterAdamW:
    """AdamW over fp32 masters of `params` (bf16 or fp16 leaves): step() = cast grads up, update, copy down.

    params: tensors or param-group dicts (e.g. clipfast.build.param_groups), as torch.optim takes them.
    fused_cast: do each parameter's cast up, update and copy down in one pass, reading and writing 28 bytes per
    parameter where torch's fused AdamW between two casts moves 40. On CUDA the Triton kernel kernels.adamw
    (impl="triton" forces it, e.g. under TRITON_INTERPRET=1), which a CUDA graph can capture; on the CPU a compiled
    pass (`_adamw_cast`). None (default): on CUDA only with capturable=True, the CUDA-graph step (eagerly its launch
    per parameter would cost more host time than torch's few multi-tensor launches); on the CPU where torch runs one
    intra-op thread (and not capturable). The compiled pass runs on one thread: for ViT-S/16's 62M parameters on the
    2-core CPU it took 99 ms per step against 141 ms unfused with one thread, and 106 against 79 ms with two, where
    torch's fused AdamW uses both (`OMP_NUM_THREADS=1` and `=2 pytest bench/test_bench_optim.py --benchmark-only`,
    2026-11-26 at 90d1e80). The state (exp_avg, exp_avg_sq, step) is torch.optim.AdamW's either way, so checkpoints
    do not depend on it.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.01, fused_cast: bool | None = None,
                 impl: str | None = None, **kw):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.params, master_groups = [], []
        for g in groups:
            ps = [p for p in g["params"] if p.requires_grad]
            ms = [p.detach().float().clone().requires_grad_() for p in ps]
            self.params += ps
            master_groups.append({**g, "params": ms})
        if not self.params:
            raise ValueError("MasterAdamW: no trainable parameters")
        self.master = [m for g in master_groups for m in g["params"]]
        on_cpu = all(p.device.type == "cpu" for p in self.params)
        triton = impl == "triton" or (impl is None and not on_cpu)
        capturable = bool(kw.get("capturable"))
        if fused_cast is None:
            fused_cast = capturable if triton else (not capturable and torch.get_num_threads() == 1)
        self.fused_cast = bool(fused_cast)
        self.triton = self.fused_cast and triton  # the fused step runs kernels.adamw (else the compiled CPU pass)
        if self.fused_cast and (kw.get("amsgrad") or kw.get("maximize") or (capturable and not triton)):
            raise ValueError("MasterAdamW: fused_cast=True takes no amsgrad or maximize, and capturable only with the "
                             "Triton kernel (CUDA parameters, or impl='triton')")
        # unfused: fp32 gradients of the masters, kept from step to step: a cast into a fresh tensor each step costs
        # an allocation, and on the CPU the page faults of touching it (3x the cast itself for a 19M-entry embedding)
        self._grad32 = [] if self.fused_cast else [torch.empty_like(m) for m in self.master]
        if self.fused_cast:  # torch's fused / foreach switches do not apply to the one-pass step
            kw = {k: v for k, v in kw.items() if k not in ("fused", "foreach")}
            param_of = {id(m): p for m, p in zip(self.master, self.params, strict=True)}
            self.opt = _FusedCastAdamW(master_groups, param_of, triton=self.triton, lr=lr, weight_decay=weight_decay,
                                       **kw)
        else:
            self.opt = torch.optim.AdamW(master_groups, lr=lr, weight_decay=weight_decay, **kw)

    @property
    def param_groups(self):
        return self.opt.param_groups

    @property
    def state(self):
        return self.opt.state

    def set_overlap(self, enable: bool = True) -> MasterAdamW:
        """Step inside the backward: with overlap on, after begin_step() each parameter is updated as soon as its
        gradient is complete (a post-accumulate-grad hook), so the memory-bound update of the layers the backward has
        finished runs beside the matmuls of those it has not; step() then updates what is left and, on CUDA, makes the
        current stream wait for the in-backward launches, which run on a stream of their own. The arithmetic is
        step()'s: the same kernel, on the same complete gradients, so the result is the same.

        For a step with one backward and no clipping (the global gradient norm is known only after the whole
        backward): GraphedTrainStep turns it on there. The Triton step only (capturable=True on CUDA, or
        impl="triton"). Without a begin_step the hooks do nothing, and step() is the usual one."""
        if enable and not self.triton:
            raise ValueError("MasterAdamW.set_overlap: the step inside the backward runs the Triton step only "
                             "(capturable=True on CUDA, or impl='triton')")
        if self.fused_cast:
            self.opt.set_overlap(enable)
        return self

    @property
    def overlap(self) -> bool:
        return self.fused_cast and self.opt.overlap

    def begin_step(self) -> None:
        """The next backward is this step's only one, unclipped: update each parameter when its gradient is done
        (set_overlap). step() must follow that backward."""
        if not self.overlap:
            raise ValueError("MasterAdamW.begin_step: overlap is off (set_overlap(True) first)")
        self.opt.begin_step()

    @property
    def grad_scale(self):
        """What the fused step divides the gradients by (clipped_step sets it); None: nothing."""
        return getattr(self.opt, "grad_scale", None)

    @grad_scale.setter
    def grad_scale(self, value):
        self.opt.grad_scale = value

    def master_bytes(self) -> int:
        """What this optimizer holds beside torch's AdamW state: the fp32 masters and, unfused, their fp32 gradient
        buffers (kept from step to step)."""
        return sum(t.numel() * t.element_size() for t in (*self.master, *self._grad32))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self.opt.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        if self.fused_cast:  # gradients read from the bf16 parameters inside the step
            self.opt.step()
            return
        for m, g32, p in zip(self.master, self._grad32, self.params, strict=True):
            m.grad = None if p.grad is None else g32.copy_(p.grad)  # (a parameter without a gradient is skipped)
        self.opt.step()
        torch._foreach_copy_([p for p in self.params], self.master)  # fp32 -> bf16, round to nearest

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "master": [m.detach().clone() for m in self.master]}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        if len(sd["master"]) != len(self.master):
            raise ValueError(f"MasterAdamW state has {len(sd['master'])} masters, this optimizer {len(self.master)}")
        for m, saved, p in zip(self.master, sd["master"], self.params, strict=True):
            m.copy_(saved)
            p.copy_(saved)  # the weights are the masters rounded
        self.opt.load_state_dict(run_as_own(sd["opt"], self.opt))


# how an optimizer runs, not what it learnt: kept from the optimizer a saved state is loaded into
RUN_FLAGS = ("capturable", "fused", "foreach", "differentiable")


def run_as_own(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A saved optimizer state_dict to load into `optimizer`, run the way it runs: a checkpoint of the CUDA-graph step
    (capturable, lr a device tensor) resumes in an eager step and back, so RUN_FLAGS stay the optimizer's own and a
    saved lr tensor becomes a float where it holds a float (torch's load_state_dict would take the saved ones)."""
    groups = [dict(g) for g in saved["param_groups"]]
    for g, own in zip(groups, optimizer.param_groups, strict=False):
        g.update({k: own[k] for k in RUN_FLAGS if k in own})
        if isinstance(g["lr"], torch.Tensor) and not isinstance(own["lr"], torch.Tensor):
            g["lr"] = float(g["lr"])
    return {**saved, "param_groups": groups}


def folds_clipping(optimizer) -> bool:
    """Whether clipped_step can hand the clipping to the optimizer's own kernel: torch's fused AdamW (not capturable;
    its grad_scale input is what GradScaler uses), or MasterAdamW's Triton step (kernels.adamw, capturable too)."""
    if isinstance(optimizer, MasterAdamW):
        return optimizer.triton
    return type(optimizer) is torch.optim.AdamW and all(g.get("fused") and not g.get("capturable")
                                                        for g in optimizer.param_groups)


@contextlib.contextmanager
def clipped_step(optimizer, params, max_norm: float):
    """Gradients clipped to a global L2 norm of max_norm for the optimizer step run inside the block.

    torch's fused AdamW does it in its own pass: the norm is one read of the gradients, and the kernel divides each
    gradient by max(1, (norm + 1e-6) / max_norm) (its grad_scale input) where clip_grad_norm_ multiplies every
    gradient in a pass of its own (with the norm, 44 ms of ViT-S/16's 406 ms step on the CPU through DeepSpeed's
    clipping). Any other optimizer gets torch.nn.utils.clip_grad_norm_ first. max_norm 0 or None: no clipping.
    """
    fold = bool(max_norm) and folds_clipping(optimizer)
    if max_norm and not fold:
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    elif fold:
        grads = [p.grad for p in params if p.grad is not None]
        # in float32 whatever the gradients' dtype (get_total_norm sums bf16 gradients' norms in bf16); on their device
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)))
        optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0)
    try:
        yield
    finally:
        if fold:
            optimizer.grad_scale = None
