"""clipfast: a performance-first CLIP trainer (CLIPA token reduction, Triton kernels, DALI, DeepSpeed)."""
from setuptools import find_packages, setup

setup(
    name="clipfast",
    version="0.1.0",
    description="Performance-first CLIP training: few tokens, fused Triton kernels, DALI data, DeepSpeed ZeRO.",
    python_requires=">=3.11",
    packages=find_packages(include=["clipfast", "clipfast.*", "kernels", "kernels.*"]),
    install_requires=[
        # torch and torchvision are pinned together: pip takes both from wheels already on the machine.
        "torch==2.14.1",
        "torchvision==0.29.1",
        "triton",  # the version torch 2.14.1 pins
        "deepspeed==0.19.8",
        "nvidia-dali-cuda130==2.4.0",
        "open-clip-torch==3.3.0",
        "numpy",
        "tqdm",
        "tensorboard",
        "lemminflect",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "ruff", "scikit-learn", "matplotlib"],
    },
)
