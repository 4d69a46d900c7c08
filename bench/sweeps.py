"""The kernels' candidate launch configs, each checked against the default's outputs, then timed: one function per
kernel, run by bench/sweep_kernels.py (which says what is swept, at which shapes, and why).

Each sweep_<kernel>(s, device, dtype, timer, smoke) returns {table name: [row, ...]}, a row being
dict(config=..., ms=... or None with error=..., default=bool, torch=bool for the torch op beside them).
"""
from __future__ import annotations

import itertools
import sys

import torch
import torch.nn.functional as F
import triton

import kernels.adamw  # noqa: F401
import kernels.gelu  # noqa: F401
import kernels.layer_norm  # noqa: F401
import kernels.linear as lin
import kernels.mlp  # noqa: F401
import kernels.short_attention  # noqa: F401

# kernels/__init__ re-exports functions under the modules' names: take the modules themselves
ln = sys.modules["kernels.layer_norm"]
ge = sys.modules["kernels.gelu"]
sa = sys.modules["kernels.short_attention"]

# text_rows: the packed captions of a batch at the goal points' caption lengths (bench/points.py's log-normal mix:
# ~11.6 of 16 and ~7.4 of 8 tokens a caption on average), text_width the text tower's
SHAPES = {"B/16 112px": dict(rows=51200, width=768, mlp=3072, batch=1024, tokens=50, heads=12, text_rows=11904,
                             text_width=512),
          "L/16 96px": dict(rows=18944, width=1024, mlp=4096, batch=512, tokens=37, heads=16, text_rows=3840,
                            text_width=768)}
SMOKE = {"smoke": dict(rows=40, width=48, mlp=96, batch=2, tokens=5, heads=2, text_rows=37, text_width=16)}


def _with(grid, default) -> list:
    """The candidate configs with the default among them (first, when the grid lacks it)."""
    grid = list(grid)
    return grid if default in grid else [default, *grid]


def _measure(config, run_check, timer, default) -> dict:
    run, check = run_check
    try:
        run()
        wrong = check()
    except Exception as e:  # a config that fails to compile (registers, shared memory) is reported, not fatal
        return dict(config=config, ms=None, error=f"{type(e).__name__}: {str(e)[:120]}", default=default)
    if wrong:
        return dict(config=config, ms=None, error=f"WRONG {wrong}", default=default)
    return dict(config=config, ms=timer(run), default=default)



def _close(a, b, what) -> str | None:
    """None when a matches b (bf16 outputs: within 2 ulp-ish, fp32 partial sums: relative 1e-3), else why not."""
    a, b = a.float(), b.float()
    tol = 2e-2 * b.abs().max().clamp_min(1e-6) if a.numel() else 0
    err = (a - b).abs().max().item() if a.numel() else 0.0
    return None if err <= tol else f"{what}: max |diff| {err:.3g} > {float(tol):.3g}"


# ---- add_layer_norm -------------------------------------------------------------------------------------------

def sweep_add_ln(s, device, dtype, timer, smoke):
    M, N = s["rows"], s["width"]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(M, N, generator=g).to(device, dtype)
    r = torch.randn(M, N, generator=g).to(device, dtype)
    w = (1 + 0.1 * torch.randn(N, generator=g)).to(device, dtype)
    b = (0.1 * torch.randn(N, generator=g)).to(device, dtype)
    dy = torch.randn(M, N, generator=g).to(device, dtype)
    ds = torch.randn(M, N, generator=g).to(device, dtype)
    y0, mean, rstd, s0 = ln._fwd(x, w, b, 1e-5, r, b)  # b doubles as the residual's bias (rb), as in the blocks

    def fwd(bm, nw):
        y = torch.empty_like(x)
        s_ = torch.empty_like(x)
        mu, rs = torch.empty(M, device=device), torch.empty(M, device=device)
        grid, args, const, opts = ln._fwd_launch(x, w, b, y, mu, rs, 1e-5, r, s_, b)
        const["BLOCK_M"], opts["num_warps"] = bm, nw

        def run():
            ln._layer_norm_fwd_kernel[(triton.cdiv(M, bm),)](**args, **const, **opts)

        return run, lambda: _close(y, y0, "y") or _close(s_, s0, "s")

    default = ln._config(N)
    fwd_rows = []
    for bm, nw in _with(itertools.product((1, 2, 4, 8), (2, 4, 8)) if not smoke else [(1, 1)],
                        (default["BLOCK_M"], default["num_warps"])):
        fwd_rows.append(_measure(f"BLOCK_M={bm} warps={nw}", fwd(bm, nw), timer,
                                 (bm, nw) == (default["BLOCK_M"], default["num_warps"])))

    def torch_fwd():
        s_ = x + (r + b)
        F.layer_norm(s_, (N,), w, b, 1e-5)

    fwd_rows.append(dict(config="torch: add + F.layer_norm", ms=timer(torch_fwd), torch=True))

    dx0, dw0, db0, drb0 = ln._bwd(dy, s0, w, mean, rstd, ds, b)  # with the residual bias's gradient, as the blocks

    def bwd(bm, nw, per_sm, stages):
        progs, rows = ln._bwd_programs(M, bm, device, per_sm)
        dx = torch.empty_like(x)
        part = torch.empty(progs, 3, N, device=device)
        grid, args, const, opts = ln._bwd_launch(s0, w, dy, dx, mean, rstd, part, rows, ds)
        const["BLOCK_M"], const["STAGES"], opts["num_warps"] = bm, stages, nw
        out = {}

        def run():
            ln._layer_norm_bwd_kernel[grid](**args, **const, **opts)
            out["dw"], out["db"], out["drb"] = ln.finish_sums(part, w.dtype)  # as ln._bwd finishes them

        return run, lambda: (_close(dx, dx0, "dx") or _close(out["dw"], dw0, "dw") or _close(out["db"], db0, "db")
                             or _close(out["drb"], drb0, "drb"))

    bwd_rows = []
    # stages > 1: the row loop's loads pipelined (kernels.layer_norm.BWD_STAGES); the unpipelined grid is the part of
    # the dab88c7 sweep's 36 configs (BLOCK_M 2-8, warps 4-16, programs per SM 2-16) around its winner
    grid = [*itertools.product((2, 4), (4, 8), (4, 8, 16), (1,)),
            *itertools.product((1, 2), (4,), (4, 8, 16), (2, 3)), (4, 8, 8, 2)] if not smoke else [(1, 1, 4, 2)]
    bdef = ln._bwd_config(N)
    _, def_rows = ln._bwd_programs(M, bdef["BLOCK_M"], device)  # the stages the default chooses for its loop
    bdef = (bdef["BLOCK_M"], bdef["num_warps"], ln.PROGRAMS_PER_SM, ln._bwd_stages(def_rows, bdef["BLOCK_M"]))
    for bm, nw, per_sm, st in _with(grid, bdef):
        bwd_rows.append(_measure(f"BLOCK_M={bm} warps={nw} programs/SM={per_sm} stages={st}",
                                 bwd(bm, nw, per_sm, st), timer, (bm, nw, per_sm, st) == bdef))
    s_t = s0.detach().clone().requires_grad_()
    w_t, b_t = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y_t = F.layer_norm(s_t, (N,), w_t, b_t, 1e-5)

    def torch_bwd():
        gs, _, _ = torch.autograd.grad(y_t, (s_t, w_t, b_t), dy, retain_graph=True)
        (gs + ds).sum(0)  # the residual's gradient joins the norm's (autograd's add); the residual bias's gradient

    bwd_rows.append(dict(config="torch: F.layer_norm backward + add + bias sum", ms=timer(torch_bwd), torch=True))
    return {"add_layer_norm forward": fwd_rows, "add_layer_norm backward": bwd_rows}


# ---- GELU backward --------------------------------------------------------------------------------------------

def sweep_gelu(s, device, dtype, timer, smoke):
    M, N = s["rows"], s["mlp"]
    g = torch.Generator(device="cpu").manual_seed(1)
    da = torch.randn(M, N, generator=g).to(device, dtype)
    h = torch.randn(M, N, generator=g).to(device, dtype)
    dh0, db0 = ge.gelu_bwd(da, h)
    default = ge._config()

    def bwd(bm, bn, nw, per_sm, stages):
        col_blocks = triton.cdiv(N, bn)
        groups, rows = ge._row_groups(M, N, bm, bn, device, per_sm)
        dh = torch.empty_like(h)
        db_part = torch.empty(groups, N, device=device)
        grid, args, const, opts = ge._bwd_launch(da, h, dh, db_part, rows)
        const.update(BLOCK_M=bm, BLOCK_N=bn, STAGES=stages)
        opts["num_warps"] = nw
        out = {}

        def run():
            ge._gelu_bwd_kernel[(col_blocks, groups)](**args, **const, **opts)
            out["db"] = ge.finish_sums(db_part, torch.float32)

        return run, lambda: _close(dh, dh0, "dh") or _close(out["db"], db0, "db")

    rows_out = []
    # stages > 1: the loads pipelined (kernels.gelu.BWD_STAGES); the unpipelined grid is the part of the dab88c7
    # sweep's 54 configs (BLOCK_M 16-64, BLOCK_N 64-256, warps 4-8, programs per SM 4-16) around its winner
    grid = [*itertools.product((16, 32), (64, 128), (8,), (4, 8, 16), (1,)),
            *itertools.product((16, 32), (64,), (8,), (8, 16), (2, 3))] if not smoke else [(8, 16, 1, 4, 2)]
    gdef = (default["BLOCK_M"], default["BLOCK_N"], default["num_warps"], ge.PROGRAMS_PER_SM, ge.BWD_STAGES)
    for bm, bn, nw, per_sm, st in _with(grid, gdef):
        if bm * bn > 16384 or bm * bn < 32 * nw:  # tiles too big for registers, or too small for the warps
            continue
        rows_out.append(_measure(f"BLOCK_M={bm} BLOCK_N={bn} warps={nw} programs/SM={per_sm} stages={st}",
                                 bwd(bm, bn, nw, per_sm, st), timer, (bm, bn, nw, per_sm, st) == gdef))

    def torch_bwd():
        torch.ops.aten.gelu_backward(da, h).sum(0)

    rows_out.append(dict(config="torch: GeluBackward + bias sum", ms=timer(torch_bwd), torch=True))
    return {"GELU backward + bias grad": rows_out}


# ---- short attention ------------------------------------------------------------------------------------------

def sweep_attention(s, device, dtype, timer, smoke):
    """The model's path: the qkv projection's bias added in the kernels, its gradient's column sums in the backward.
    Forward: _short_attn_fwd_kernel (its key loop) over warps x stages, and the one-tile forward without a key loop
    (_short_attn_fwd_tile_kernel; 1 pair and 1 stage the default since 2026-11-27) at 1, 2 and 4 (sequence, head)
    pairs per program x pipelining stages (FWD_HEADS);
    backward: warps x stages, and 2 pairs per program (BWD_HEADS)."""
    B, N, H, d = s["batch"], s["tokens"], s["heads"], 64 if not smoke else 16
    g = torch.Generator(device="cpu").manual_seed(2)
    qkv = torch.randn(B, N, 3, H, d, generator=g).to(device, dtype)
    bias = (0.1 * torch.randn(3, H, d, generator=g)).to(device, dtype)
    do = torch.randn(B, N, H, d, generator=g).to(device, dtype)
    scale = d**-0.5
    interp = not qkv.is_cuda
    fcfg, bcfg = sa._fwd_config(N, d), sa._bwd_config(N, d)
    ftile = (fcfg.pop("HPP", 0), fcfg.pop("STAGES", 1))  # the default's one-tile pairs and stages (0: the key loop)
    o0 = torch.empty(B, N, H, d, device=device, dtype=dtype)
    lse0 = torch.empty(B * H, N, device=device)
    sa._launch(sa._short_attn_fwd_kernel, *sa._fwd_launch(qkv, o0, lse0, False, scale, fcfg, interp, bias))
    dqkv0 = torch.empty_like(qkv)
    part0 = torch.empty(B, 3, H, d, device=device)
    sa._launch(*sa._bwd_launch(qkv, o0, do, dqkv0, lse0, None, False, scale, dict(bcfg, HPP=1), interp, bias, part0))

    def fwd(nw, ns, hpp=0):
        o, lse = torch.empty_like(o0), torch.empty_like(lse0)
        cfg = dict(fcfg, num_warps=nw, num_stages=2 if hpp else ns)
        if hpp:
            grid, args, const, opts = sa._fwd_tile_launch(qkv, o, lse, False, scale, dict(cfg, HPP=hpp, STAGES=ns),
                                                          interp, bias)  # fmt: skip
            kernel = sa._short_attn_fwd_tile_kernel
        else:
            grid, args, const, opts = sa._fwd_launch(qkv, o, lse, False, scale, cfg, interp, bias)
            kernel = sa._short_attn_fwd_kernel
        return (lambda: kernel[grid](**args, **const, **opts)), \
            lambda: _close(o, o0, "o") or _close(lse, lse0, "lse")

    def bwd(nw, ns, hpp=1):
        dqkv, part = torch.empty_like(qkv), torch.empty_like(part0)
        kernel, grid, args, const, opts = sa._bwd_launch(qkv, o0, do, dqkv, lse0, None, False, scale,
                                                         dict(bcfg, num_warps=nw, num_stages=1, HPP=hpp, STAGES=ns),
                                                         interp, bias, part)  # fmt: skip
        if hpp == 1:
            opts["num_stages"] = ns
        return (lambda: kernel[grid](**args, **const, **opts)), \
            lambda: _close(dqkv, dqkv0, "dqkv") or _close(part, part0, "dbias part")

    cand = list(itertools.product((4, 8), (1, 2, 3))) if not smoke else [(2, 1)]
    fdef, bdef = (fcfg["num_warps"], fcfg["num_stages"]), (bcfg["num_warps"], bcfg["num_stages"])
    fwd_rows = [_measure(f"warps={nw} stages={ns}", fwd(nw, ns), timer, not ftile[0] and (nw, ns) == fdef)
                for nw, ns in _with(cand, fdef)]
    tiles = [(4, st, hpp) for hpp in (1, 2, 4) for st in (1, 2)] + [(8, 1, 1)] if not smoke else [(2, 1, 2)]
    if ftile[0] and (fdef[0], ftile[1], ftile[0]) not in tiles:  # the default's own row
        tiles.insert(0, (fdef[0], ftile[1], ftile[0]))
    fwd_rows += [_measure(f"one-tile kernel, {hpp} pair(s) per program, loop stages={st}, warps={nw}",
                          fwd(nw, st, hpp), timer, (hpp, st, nw) == (*ftile, fdef[0])) for nw, st, hpp in tiles]
    bwd_rows = [_measure(f"warps={nw} stages={ns}", bwd(nw, ns), timer, (nw, ns) == bdef)
                for nw, ns in _with(cand, bdef)]
    pairs = [(bdef[0], st, 2) for st in (1, 2)] if not smoke else [(2, 1, 2)]
    bwd_rows += [_measure(f"{hpp} pairs per program, loop stages={st}, warps={nw}", bwd(nw, st, hpp), timer, False)
                 for nw, st, hpp in pairs]
    qb = qkv + bias
    q, k, v = (t.transpose(1, 2) for t in qb.unbind(2))
    fwd_rows.append(dict(config="torch: bias add + SDPA forward",
                         ms=timer(lambda: F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in
                                                                           (qkv + bias).unbind(2)))),
                         torch=True))  # fmt: skip
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    og = F.scaled_dot_product_attention(qg, kg, vg)
    dog = do.transpose(1, 2)

    def torch_bwd():
        dq = torch.stack(torch.autograd.grad(og, (qg, kg, vg), dog, retain_graph=True), dim=2)
        dq.sum((0, 1))  # the bias gradient

    bwd_rows.append(dict(config="torch: SDPA backward (+ the stack into dqkv, the bias sum)", ms=timer(torch_bwd),
                         torch=True))
    return {f"short attention forward (N={N})": fwd_rows, f"short attention backward (N={N})": bwd_rows}


# ---- AdamW over fp32 masters ----------------------------------------------------------------------------------

def sweep_adamw(s, device, dtype, timer, smoke):
    """kernels.adamw on one MLP weight (mlp x width) in place: BLOCK x num_warps; torch: fused AdamW on the fp32
    weight (28 bytes per parameter, its gradient already fp32), and the cast up + fused AdamW + copy down that
    MasterAdamW ran before (40 bytes)."""
    ad = sys.modules["kernels.adamw"]
    n = s["mlp"] * s["width"]
    g = torch.Generator(device="cpu").manual_seed(3)
    w0 = torch.randn(n, generator=g).to(device)
    grad = (torch.randn(n, generator=g) * 1e-3).to(device, dtype)
    one = lambda x: torch.tensor(float(x), device=device)  # noqa: E731
    hp = dict(weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-6)

    def state():
        return w0.to(dtype), w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)

    p_ref, w_ref, m_ref, v_ref = state()
    ad.adamw_cast_(p_ref, grad, w_ref, m_ref, v_ref, one(1), one(1e-3), **hp)

    def run_cfg(block, nw):
        p, w, m, v = state()
        grid, args, const, opts = ad._launch(p, grad, w, m, v, one(1), one(1e-3), None, 0.1, 0.9, 0.95, 1e-6,
                                             block, nw)

        def run():  # in place: _measure checks after its first call, from the reference's starting state
            ad._adamw_cast_kernel[grid](**args, **const, **opts)

        return run, lambda: _close(w, w_ref, "w") or _close(p, p_ref, "p")

    cand = [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)] if not smoke else [(256, 2)]
    default = (ad.BLOCK, ad.NUM_WARPS)
    rows = [_measure(f"BLOCK={b} warps={nw}", run_cfg(b, nw), timer, (b, nw) == default)
            for b, nw in _with(cand, default)]
    w32 = torch.nn.Parameter(w0.clone())
    w32.grad = grad.float()
    opt32 = torch.optim.AdamW([w32], lr=1e-3, weight_decay=0.1, fused=True, capturable=device.type == "cuda")
    rows.append(dict(config="torch: fused AdamW, fp32 weight and gradient", ms=timer(opt32.step), torch=True))
    g32 = torch.empty_like(w32)

    def unfused():
        w32.grad = g32.copy_(grad)
        opt32.step()
        p_ref.copy_(w32.detach())

    rows.append(dict(config="torch: cast up + fused AdamW + copy down", ms=timer(unfused), torch=True))
    return {f"AdamW over fp32 masters ({n / 1e6:.1f}M parameters)": rows}


# ---- the MLP's matmuls with the GELU in their epilogues --------------------------------------------------------

MLP_CONFIGS = [(128, 128, 64, 8, 3, 0), (128, 128, 64, 8, 4, 0), (128, 128, 64, 8, 3, 1), (128, 64, 64, 4, 4, 0),
               (64, 128, 64, 4, 4, 0)]  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, programs per SM (0: one per tile)


def sweep_mlp(s, device, dtype, timer, smoke):
    """kernels.mlp's two fused matmuls at the vision MLP's shapes: forward h, GELU(h) = x W1^T + b1 against torch's
    linear (cuBLAS, bias in its epilogue) + GELU; backward dh, db1 = (dY W2) GELU'(h) and its column sums against
    cuBLAS's dY W2 + kernels.linear_gelu's GELU backward (what the MLP runs without kernels.mlp)."""
    km = sys.modules["kernels.mlp"]
    M, K, N = s["rows"], s["width"], s["mlp"]
    g = torch.Generator(device="cpu").manual_seed(4)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    w1 = (torch.randn(N, K, generator=g) * K**-0.5).to(device, dtype)
    b1 = torch.randn(N, generator=g).to(device, dtype)
    w2 = (torch.randn(K, N, generator=g) * N**-0.5).to(device, dtype)
    dy = torch.randn(M, K, generator=g).to(device, dtype)
    h0 = F.linear(x, w1, b1)
    a0 = F.gelu(h0)
    dh0, db0 = ge.gelu_bwd(dy @ w2, h0)
    cands = MLP_CONFIGS if not smoke else [(16, 16, 16, 1, 1, 0), (16, 16, 16, 1, 1, 1)]
    def key(c):
        return c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"], c["programs"]

    fkey, bkey = key(km._config(M, N, K)), key(km._config(M, N, K, dgelu=True))

    def cfg(c):
        return dict(BLOCK_M=c[0], BLOCK_N=c[1], BLOCK_K=c[2], GROUP_M=8, num_warps=c[3], num_stages=c[4],
                    programs=c[5])

    def fwd(c):
        out = {}

        def run():
            out["h"], out["a"] = km.fc_gelu(x, w1, b1, cfg(c))

        return run, lambda: _close(out["h"], h0, "h") or _close(out["a"], a0, "a")

    def bwd(c):
        out = {}

        def run():
            out["dh"], out["db"] = km.dgelu_proj(dy, w2, h0, cfg(c))

        return run, lambda: _close(out["dh"], dh0, "dh") or _close(out["db"], db0, "db")

    def label(c):
        each = f"persistent {c[5]}/SM" if c[5] else "a tile each"
        return f"{c[0]}x{c[1]}x{c[2]} warps={c[3]} stages={c[4]} {each}"

    fwd_rows = [_measure(label(c), fwd(c), timer, c == fkey) for c in _with(cands, fkey)]
    bwd_rows = [_measure(label(c), bwd(c), timer, c == bkey) for c in _with(cands, bkey)]
    fwd_rows.append(dict(config="torch: linear (cuBLAS, bias epilogue) + GELU",
                         ms=timer(lambda: F.gelu(F.linear(x, w1, b1))), torch=True))
    bwd_rows.append(dict(config="torch: dY W2 (cuBLAS) + kernels.linear_gelu's GELU backward with the bias sum",
                         ms=timer(lambda: ge.gelu_bwd(dy @ w2, h0)), torch=True))
    return {f"MLP forward: x W1^T + b1, GELU ({M} x {K} -> {N})": fwd_rows,
            f"MLP backward: (dY W2) GELU'(h), db1 ({M} x {K} -> {N})": bwd_rows}


# ---- driver ---------------------------------------------------------------------------------------------------

# ---- the partial sums' finish ----------------------------------------------------------------------------------

def sweep_finish(s, device, dtype, timer, smoke):
    """kernels._common.finish_sums (_colsum_kernel) against torch's part.sum(0).to(dtype), at the partial sums the
    kernels write per step: the layer norm's (programs, 3, width), the GELU bias's (row groups, MLP width), the
    attention qkv bias's (sequences, 3 x width)."""
    from kernels import _common as co

    W, MLP, B = s["width"], s["mlp"], s["batch"]
    ln_progs, _ = ln._bwd_programs(s["rows"], ln._bwd_config(W)["BLOCK_M"], device)
    ge_groups, _ = ge._row_groups(s["rows"], MLP, ge._config()["BLOCK_M"], ge._config()["BLOCK_N"], device)
    sms = co._sm_count_of(device)
    g = torch.Generator(device="cpu").manual_seed(3)
    out = {}
    for what, shape in (("layer norm", (ln_progs, 3, W)), ("GELU bias", (ge_groups, MLP)), ("qkv bias", (B, 3 * W))):
        part = torch.randn(shape, generator=g).to(device)
        ref = part.sum(0).to(dtype)
        part2d = part.view(shape[0], -1)
        default = co.colsum_config(part2d.shape[1], sms, part2d.shape[0])

        def colsum(bc, br, nw, part2d=part2d, ref=ref):
            res = torch.empty(part2d.shape[1], dtype=dtype, device=device)
            _, args, const, opts = co._colsum_launch(part2d, res, sms)
            const.update(BLOCK_C=bc, BLOCK_R=br)
            opts["num_warps"] = nw

            def run():
                co._colsum_kernel[(triton.cdiv(part2d.shape[1], bc),)](**args, **const, **opts)

            return run, lambda: _close(res, ref.view(-1), "sum")

        rows = []
        grid = itertools.product((16, 32, 64), (2048, 4096, 8192), (4,)) if not smoke else [(16, 16, 1)]
        cdef = (default["BLOCK_C"], default["BLOCK_C"] * default["BLOCK_R"], default["num_warps"])
        for bc, tile, nw in _with(grid, cdef):
            br = max(1, tile // bc)
            rows.append(_measure(f"BLOCK_C={bc} BLOCK_R={br} warps={nw}", colsum(bc, br, nw), timer,
                                 (bc, tile, nw) == cdef))
        rows.append(dict(config="torch: part.sum(0).to(dtype)", ms=timer(lambda part=part: part.sum(0).to(dtype)),
                         torch=True))
        out[f"finish {what} {tuple(shape)}"] = rows
    return out


# ---- column sums (kernels.linear) ----------------------------------------------------------------------------

def sweep_colsum(s, device, dtype, timer, smoke):
    """kernels.column_sums (fp32 partials per row group, then finish_sums) against torch's x.sum(0), at the sums it
    makes per step: the text tower's qkv-bias gradient (packed tokens, 3 x text width) and the image tower's
    position-embedding gradient (batch, tokens x width)."""
    g = torch.Generator(device="cpu").manual_seed(4)
    out = {}
    for what, shape in (("text qkv bias", (s["text_rows"], 3 * s["text_width"])),
                        ("position embedding", (s["batch"], s["tokens"] * s["width"]))):
        x = torch.randn(shape, generator=g).to(device, dtype)
        ref = x.sum(0)

        def colsum(bm, bn, nw, per_sm, x=x, ref=ref):
            res = {}

            def run():
                res["y"] = lin.column_sums(x, impl="triton", block_m=bm, block_n=bn, num_warps=nw, per_sm=per_sm)

            return run, lambda: _close(res["y"], ref, "sum")

        grid = [*itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (lin.PROGRAMS_PER_SM,)),
                *itertools.product((lin.BLOCK_M,), (lin.BLOCK_N,), (lin.NUM_WARPS,), (4, 16))] \
            if not smoke else [(8, 16, 1, 4)]
        cdef = (lin.BLOCK_M, lin.BLOCK_N, lin.NUM_WARPS, lin.PROGRAMS_PER_SM)
        rows = []
        for bm, bn, nw, per_sm in _with(grid, cdef):
            if bm * bn > 16384 or bm * bn < 32 * nw:  # tiles too big for registers, or too small for the warps
                continue
            rows.append(_measure(f"BLOCK_M={bm} BLOCK_N={bn} warps={nw} programs/SM={per_sm}",
                                 colsum(bm, bn, nw, per_sm), timer, (bm, bn, nw, per_sm) == cdef))
        rows.append(dict(config="torch: x.sum(0)", ms=timer(lambda x=x: x.sum(0)), torch=True))
        out[f"column sums, {what} {tuple(shape)}"] = rows
    return out
