nvidia-smi
python3 -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda,
    torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA"); print("triton", triton.__version__)'
python3 -c 'import open_clip; print("open_clip", open_clip.__version__, open_clip.__file__)'
python3 -m pip list 2>/dev/null | grep -iE '^(torch|triton|open.clip|timm|ftfy|regex|pytest|pytest-benchmark|matplotlib|numpy) '
