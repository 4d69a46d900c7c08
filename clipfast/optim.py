"""bf16 weights with fp32 master copies: the precision clipfast trains in on a GPU, outside DeepSpeed.

DeepSpeed's bf16 mode (what `clipfast.train` runs on CUDA) keeps the model in bf16, so activations, norms and
matmuls are all bf16, and holds an fp32 master copy of the weights in the optimizer: each step casts the bf16
gradients to fp32, updates the masters, and copies them back into the bf16 weights. `MasterAdamW` does the
same for one device, so a benchmark or a CUDA-graph step (clipfast.graph) can run what the trainer runs; with
capturable=True its whole step can be captured.
"""
from __future__ import annotations

import torch


class MasterAdamW:
    """AdamW over fp32 masters of `params` (bf16 or fp16 leaves): step() = cast grads up, update, copy down.

    params: tensors or param-group dicts (e.g. clipfast.train.param_groups), as torch.optim takes them.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.01, **kw):
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
        # fp32 gradients of the masters, kept from step to step: a cast into a fresh tensor each step costs an
        # allocation, and on the CPU the page faults of touching it (3x the cast itself for a 19M-entry embedding)
        self._grad32 = [torch.empty_like(m) for m in self.master]
        self.opt = torch.optim.AdamW(master_groups, lr=lr, weight_decay=weight_decay, **kw)

    @property
    def param_groups(self):
        return self.opt.param_groups

    @property
    def state(self):
        return self.opt.state

    def master_bytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.master)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self.opt.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
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
