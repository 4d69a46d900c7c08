"""clipfast: CLIP training the CLIPA way — few tokens, fused kernels, DALI data, DeepSpeed ZeRO."""
import hashlib as _hashlib
import os as _os
import sys as _sys

__version__ = "0.1.0"

# torch builds C++ extensions (DeepSpeed's CPU shared-memory comm op: ~80 s) into one folder per Python and CUDA
# version that every venv of the user shares, so two venvs (a work tree's and a fresh clone's) each rebuilt it
# whenever the other had: 45-67 s before each launch's first step. One folder per interpreter prefix instead, unless
# TORCH_EXTENSIONS_DIR is set.
_os.environ.setdefault("TORCH_EXTENSIONS_DIR", _os.path.join(
    _os.environ.get("XDG_CACHE_HOME") or _os.path.join(_os.path.expanduser("~"), ".cache"), "torch_extensions",
    "clipfast-" + _hashlib.sha1(_sys.prefix.encode()).hexdigest()[:12]))
