"""Print the installed versions of the distributions a CI run depends on (one line each)."""

import importlib.metadata as md
import platform

NAMES = ["torch", "triton", "transformers", "kernels", "megatron-core", "liger-kernel",
         "pyarrow", "numpy", "safetensors", "tokenizers", "tyro", "pillow", "r4b-kernels", "r4b"]

print(f"ci: python {platform.python_version()}")
for name in NAMES:
    try:
        version = md.version(name)
    except md.PackageNotFoundError:
        version = "not installed"
    print(f"ci: {name} {version}")
