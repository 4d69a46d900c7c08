"""bf16 weights with fp32 master copies: the precision clipfast trains in on a GPU, outside DeepSpeed.

DeepSpeed's bf16 mode (what `clipfast.train` runs on CUDA) keeps the model in bf16, so activations, norms and
matmuls are all bf16, and holds an fp32 master copy of the weights in the optimizer: each step casts the bf16
gradients to fp32, updates the masters, and copies them back into the bf16 weights. `MasterAdamW` does the
same for one device, so a benchmark or a CUDA-graph step (clipfast.graph) can run what the trainer runs; with
capturable=True its whole step can be captured. On the CPU (by default) each parameter's cast, update and copy
run as one compiled pass instead (fused_cast).
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch

log = logging.getLogger(__name__)


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

    def __init__(self, groups, param_of: dict, **kw):
        super().__init__(groups, **kw)
        self._param_of = param_of  # id(master) -> bf16 parameter

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterAdamW(fused_cast=True) takes no closure")
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


class MasterAdamW:
    """AdamW over fp32 masters of `params` (bf16 or fp16 leaves): step() = cast grads up, update, copy down.

    params: tensors or param-group dicts (e.g. clipfast.train.param_groups), as torch.optim takes them.
    fused_cast: do each parameter's cast up, update and copy down in one compiled pass (`_adamw_cast`), reading and
    writing 28 bytes per parameter where torch's fused AdamW between two casts moves 40: on the 2-core CPU 104 vs
    150 ms per step for ViT-S/16's 62M parameters (bench/test_bench_optim.py). None (default): on the CPU, unless
    capturable. The state (exp_avg, exp_avg_sq, step) is torch.optim.AdamW's either way, so checkpoints do not depend
    on it.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.01, fused_cast: bool | None = None, **kw):
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
        self.fused_cast = on_cpu and not kw.get("capturable") if fused_cast is None else bool(fused_cast)
        if self.fused_cast and (kw.get("capturable") or kw.get("amsgrad") or kw.get("maximize")):
            raise ValueError("MasterAdamW: fused_cast=True does not take capturable, amsgrad or maximize")
        # unfused: fp32 gradients of the masters, kept from step to step: a cast into a fresh tensor each step costs
        # an allocation, and on the CPU the page faults of touching it (3x the cast itself for a 19M-entry embedding)
        self._grad32 = [] if self.fused_cast else [torch.empty_like(m) for m in self.master]
        if self.fused_cast:  # torch's fused / foreach switches do not apply to the one-pass step
            kw = {k: v for k, v in kw.items() if k not in ("fused", "foreach")}
            param_of = {id(m): p for m, p in zip(self.master, self.params, strict=True)}
            self.opt = _FusedCastAdamW(master_groups, param_of, lr=lr, weight_decay=weight_decay, **kw)
        else:
            self.opt = torch.optim.AdamW(master_groups, lr=lr, weight_decay=weight_decay, **kw)

    @property
    def param_groups(self):
        return self.opt.param_groups

    @property
    def state(self):
        return self.opt.state

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
        self.opt.load_state_dict(sd["opt"])


def folds_clipping(optimizer) -> bool:
    """Whether clipped_step can hand the clipping to the optimizer's own kernel: torch's fused AdamW (not capturable;
    its grad_scale input is what GradScaler uses)."""
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
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)  # float32 for float32 gradients; on their device
        optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0)
    try:
        yield
    finally:
        if fold:
            optimizer.grad_scale = None
