"""Ahead-of-time compile of a @triton.jit kernel for H100 (sm_90), no GPU needed: what did it cost?

    from kernels.aot import compile_sm90
    r = compile_sm90(_my_kernel,
                     signature={"x": "*bf16", "out": "*bf16", "n": "i32"},   # every runtime argument
                     constexprs={"BLOCK": 128},                               # every constexpr argument
                     num_warps=8, num_stages=3)
    r.registers, r.spills, r.local, r.shared, r.wgmma   # regs/thread, spill bytes, stack bytes, smem bytes, bool
    print(r.row())                                 # one line for a resource table

Types are Triton's signature strings: "*fp32", "*bf16", "*fp16", "*i32", "*i64", "*u8", "i32", "i64", "fp32".
Like the runtime launcher, pointers get 16-byte alignment hints (`aligned`, default: every pointer;
torch allocations are 256-byte aligned). Integers get no divisibility hint unless listed in `aligned`
(the launcher gives one to ints divisible by 16), and the launcher turns an int argument equal to 1 into
a constant: pass such arguments (e.g. a unit stride) in `constexprs` to compile the same specialisation.

Or, from the launcher's own argument values (tensors may live on the meta device, so no GPU is needed):

    r = compile_sm90_like(_my_kernel, {"x": x, "out": out, "n": n}, {"BLOCK": 128}, num_warps=8)

which applies the runtime launcher's specialisation rules (see `specialize`).

Resources are read from the compiled cubin with cuobjdump (`--dump-resource-usage`: registers, local
memory/stack frame) and from Triton's own `ptxas -v` log for that cubin (spill stores + loads; where
the knobs to capture it are missing, ptxas is run again on the PTX); shared memory is
Triton's launch size (metadata.shared, includes the dynamic part). Both tools ship with Triton
(triton/backends/nvidia/bin). `wgmma` is True when the PTX issues Hopper warpgroup MMAs.
"""
import contextlib
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@dataclass
class KernelResources:
    name: str
    num_warps: int
    num_stages: int
    registers: int | None  # per thread, from cuobjdump (None if the tool is missing)
    spills: int | None  # spill stores + spill loads in bytes, from ptxas -v (None if ptxas is missing)
    local: int | None  # per-thread local memory / stack frame in bytes (spills live there), from cuobjdump
    shared: int  # bytes of shared memory per program (Triton's launch size)
    wgmma: bool  # PTX uses wgmma.mma_async (Hopper tensor cores)
    ptx: str = field(repr=False, default="")
    cubin: bytes = field(repr=False, default=b"")

    def row(self, label: str = "") -> str:
        return (f"{label or self.name:<40} warps={self.num_warps} stages={self.num_stages} regs={self.registers} "
                f"spills={self.spills}B local={self.local}B smem={self.shared / 1024:.1f}KiB wgmma={self.wgmma}")


def nvidia_tool(name: str) -> str | None:
    """Path of a CUDA binary (ptxas, cuobjdump) shipped with Triton or on PATH; None if absent."""
    try:
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
        if path and os.path.exists(path):
            return path
    except Exception:  # older/newer triton without knobs.nvidia.<name>: fall back to the folder and PATH
        pass
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return here if os.path.exists(here) else shutil.which(name)


def compile_sm90(fn, signature: dict, constexprs: dict | None = None, *, num_warps: int = 4, num_stages: int = 3,
                 aligned=None, capability: int = 90, maxnreg: int | None = None) -> KernelResources:
    """Compile `fn` for GPUTarget("cuda", capability, 32) and read its resource use; see the module docstring.

    Under TRITON_INTERPRET=1 `fn` is an interpreter object that cannot be compiled; the compile then runs in a
    child Python without the interpreter, importing `fn` from its module by name (so it must be module-level)."""
    if not hasattr(fn, "cache_key"):
        return _compile_in_child(fn, signature, constexprs, num_warps=num_warps, num_stages=num_stages,
                                 aligned=aligned, capability=capability, maxnreg=maxnreg)
    constexprs = dict(constexprs or {})
    names = list(fn.arg_names)
    missing = [a for a in names if a not in signature and a not in constexprs]
    extra = [a for a in list(signature) + list(constexprs) if a not in names]
    if missing or extra:
        raise ValueError(f"{fn.__name__}: arguments without a type or constexpr value: {missing}; unknown: {extra}")
    sig = {a: ("constexpr" if a in constexprs else signature[a]) for a in names}
    if aligned is None:
        aligned = [a for a in names if a not in constexprs and str(signature[a]).startswith("*")]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:  # the launch option of that name: a register cap per thread
        options["maxnreg"] = maxnreg
    k, log = _compile_with_ptxas_log(src, GPUTarget("cuda", capability, 32), options)
    ptx, cubin = k.asm["ptx"], k.asm["cubin"]
    regs, local = _cuobjdump_usage(cubin)
    spills = _parse_spills(log) if log else _ptxas_spills(ptx, capability)
    return KernelResources(name=fn.__name__, num_warps=num_warps, num_stages=num_stages, registers=regs,
                           spills=spills, local=local, shared=int(k.metadata.shared),
                           wgmma="wgmma.mma_async" in ptx, ptx=ptx, cubin=cubin)


_TORCH_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64", "int64": "i64",
                "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def specialize(args: dict):
    """Runtime arguments -> (signature, extra constexprs, aligned names), as Triton's launcher specialises them:
    a tensor is a pointer, assumed 16-byte aligned; an int equal to 1 becomes a constant; an int divisible
    by 16 gets a divisibility hint; bools are i1 (unless passed as constexprs), floats fp32."""
    sig, const, aligned = {}, {}, []
    for name, v in args.items():
        if hasattr(v, "dtype") and hasattr(v, "data_ptr"):
            sig[name] = "*" + _TORCH_TYPES[str(v.dtype).removeprefix("torch.")]
            aligned.append(name)
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                const[name] = 1
                continue
            sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                aligned.append(name)
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"argument {name}: cannot type {type(v).__name__}; pass it in constexprs")
    return sig, const, aligned


def compile_sm90_like(fn, args: dict, constexprs: dict | None = None, **kw) -> KernelResources:
    """compile_sm90 with the signature taken from example runtime `args` (see `specialize`)."""
    sig, const, aligned = specialize(args)
    return compile_sm90(fn, sig, {**const, **(constexprs or {})}, aligned=aligned, **kw)


def _compile_in_child(fn, signature, constexprs, **kw):
    py = getattr(fn, "fn", fn)
    job = {"module": py.__module__, "name": py.__name__, "signature": signature, "constexprs": constexprs, "kw": kw}
    code = ("import pickle, sys, importlib; from kernels.aot import compile_sm90; job = pickle.load(sys.stdin.buffer); "
            "fn = getattr(importlib.import_module(job['module']), job['name']); "
            "r = compile_sm90(fn, job['signature'], job['constexprs'], **job['kw']); "
            "open(sys.argv[1], 'wb').write(pickle.dumps(r))")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "result.pkl")
        out = subprocess.run([sys.executable, "-c", code, path], input=pickle.dumps(job), capture_output=True, env=env)
        if out.returncode:
            err = out.stderr.decode()[-4000:]
            raise RuntimeError(f"AOT compile of {py.__name__} failed in the child process:\n{err}")
        with open(path, "rb") as f:
            return pickle.load(f)


def _compile_with_ptxas_log(src, target, options):
    """Compile, capturing Triton's own `ptxas -v` log (knobs of triton >= 3.4; '' where they are missing)."""
    try:
        from triton import knobs

        scope = knobs.nvidia.scope, knobs.compilation.scope
        knobs.nvidia.dump_ptxas_log  # noqa: B018 (probe: raises AttributeError on triton without it)
    except (ImportError, AttributeError):
        return triton.compile(src, target=target, options=options), ""
    buf = io.StringIO()
    with scope[0](), scope[1](), contextlib.redirect_stdout(buf):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
        k = triton.compile(src, target=target, options=options)
    return k, buf.getvalue()


def _parse_spills(log: str):
    found = re.findall(r"(\d+) bytes spill (?:stores|loads)", log)
    return sum(int(n) for n in found) if found else None


def _cuobjdump_usage(cubin: bytes):
    tool = nvidia_tool("cuobjdump")
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    reg = re.search(r"REG:(\d+)", out.stdout)
    loc = [int(n) for n in re.findall(r"(?:LOCAL|STACK):(\d+)", out.stdout)]
    return (int(reg.group(1)) if reg else None), (max(loc) if loc else None)


def _ptxas_spills(ptx: str, capability: int):
    tool = nvidia_tool("ptxas")
    if tool is None:
        return None
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([tool, "-v", f"--gpu-name={arch}", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True)
    return _parse_spills(out.stdout + out.stderr)


def resource_table(cases, compile_one) -> dict:
    """label -> KernelResources for `cases` of (label, *args): compile_one(*args), its ptx and cubin dropped (so the
    table pickles small across `without_interpreter`'s child process)."""
    out = {}
    for label, *args in cases:
        r = compile_one(*args)
        r.ptx, r.cubin = "", b""
        out[label] = r
    return out


def check(r: KernelResources, label: str, wgmma: bool = False) -> None:
    """The AOT tests' verdict on one compile: print its row under `label`, then fail (AssertionError) on register
    spills, on local memory, and, where `wgmma` is asked for, on a PTX without Hopper warpgroup MMAs."""
    print("\n" + r.row(label))
    if r.spills != 0:
        raise AssertionError(f"{label}: {r.spills} bytes of register spills")
    if r.local != 0:
        raise AssertionError(f"{label}: {r.local} bytes of local memory / stack frame")
    if wgmma and not r.wgmma:
        raise AssertionError(f"{label}: no wgmma in the PTX (tensor cores not used the Hopper way)")


def without_interpreter(module: str, func: str = "compile_all"):
    """`module.func()` (e.g. a test's label -> KernelResources table, ptx and cubin dropped so it pickles small),
    compiled with the interpreter off: here when TRITON_INTERPRET is unset, else in one child process (Triton reads
    the variable once, at import). `module` is imported by name, from the repo root."""
    import importlib

    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return getattr(importlib.import_module(module), func)()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import pickle, sys; from {module} import {func}; "
            f"sys.stdout.buffer.write(pickle.dumps({func}()))")  # fmt: skip
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(p for p in [root, *sys.path] if p))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"compiling {module}.{func} without the interpreter failed:\n"
                           f"{done.stderr.decode()[-4000:]}")  # fmt: skip
    return pickle.loads(done.stdout)
