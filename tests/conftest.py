"""Test setup: without a GPU, Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is imported, so it is set here, before any test module loads.
"""
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if _HAS_CUDA else "cpu"


@pytest.fixture
def device():
    return DEVICE


requires_cuda = pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA GPU")


from clipfast.launch import free_port  # noqa: E402,F401  (a test's MASTER_PORT; tests import it from here)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """The demo dataset at 32 px (clipfast.data.demo): train/ and val/ shards, built once per session."""
    from clipfast.data.demo import build

    out = tmp_path_factory.mktemp("digits")
    build(out, seed=0, size=32)
    return out


def aot_module(module: str, cases, compile_one):
    """The sm_90 AOT test modules' shared pieces, as (pytestmark, compile_all, resources):
    - pytestmark skips the module where ptxas or cuobjdump is missing;
    - compile_all() is the label -> KernelResources table of `cases` (compile_one(*case[1:]); ptx and cubin dropped);
    - resources is a module-scoped fixture: `module`.compile_all() run with the interpreter off
      (kernels.aot.without_interpreter, a child process when TRITON_INTERPRET=1).
    Use, after CASES and _compile: `pytestmark, compile_all, resources = aot_module(__name__, CASES, _compile)`."""
    from kernels.aot import nvidia_tool, resource_table, without_interpreter

    mark = pytest.mark.skipif(nvidia_tool("ptxas") is None or nvidia_tool("cuobjdump") is None,
                              reason="ptxas/cuobjdump not found (triton/backends/nvidia/bin or PATH)")  # fmt: skip

    def compile_all() -> dict:
        return resource_table(cases, compile_one)

    resources = pytest.fixture(scope="module", name="resources")(lambda: without_interpreter(module))
    return mark, compile_all, resources


@pytest.fixture(scope="session")
def corrupt_demo(tmp_path_factory):
    """The demo dataset at 32 px with one more training shard beside train/'s: a cut image ("cut", no end marker), a
    sample without a caption ("nocap") and a good one ("fine"): two skips that readers must count."""
    import numpy as np

    from clipfast.data import write_shard
    from clipfast.data.demo import build, digit_jpeg

    out = tmp_path_factory.mktemp("demo")
    build(out, seed=0, size=32)
    good = digit_jpeg(np.eye(8) * 16, 32)
    write_shard(out / "train" / "zz-corrupt.tar", [
        {"__key__": "cut", "jpg": good[: len(good) // 2], "txt": "a cut image"},
        {"__key__": "nocap", "jpg": good},
        {"__key__": "fine", "jpg": good, "txt": "the digit one, ok"},
    ])
    return out
