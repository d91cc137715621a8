"""What the checks run on: the GPU and its driver, the versions of the software they measure, and
whether fatscale's requirements are met.

    python -m benchmarks.gpu.check_env --out DIR [--device cuda|cpu]

Results:
  env           the GPU (name, memory, compute capability), the driver, Python, torch and its CUDA,
                triton, timm, numpy, DALI, DeepSpeed, webdataset, MLflow
  requirements  every dependency of fatscale's pyproject.toml met by what this Python sees
                (install/verify_requirements.py): timm's bounds above all (>=1.0.20,<1.1: fatscale
                uses timm internals); on a FAIL the suite runs no further check, since its figures
                would not be fatscale's
"""

from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata

from benchmarks.gpu.common import REPO, check_main, gib
from benchmarks.gpu.results import Results

PACKAGES = ("torch", "triton", "timm", "numpy", "nvidia-dali-cuda130", "nvidia-dali-cuda120", "deepspeed", "webdataset",
            "mlflow", "mlflow-skinny", "torchvision", "pillow")


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def driver() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception as e:  # noqa: BLE001  (no driver, no library: said in the figure)
        return f"? ({type(e).__name__})"


def run(args: argparse.Namespace, results: Results) -> None:
    import torch

    versions = {name: v for name in PACKAGES if (v := version(name)) is not None}
    if args.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        gpu = dict(gpu=p.name, memory_gib=round(gib(p.total_memory), 1), capability=f"{p.major}.{p.minor}",
                   driver=driver(), cuda=torch.version.cuda)
        where = f"{p.name}, {gib(p.total_memory):.0f} GiB, sm_{p.major}{p.minor}, driver {gpu['driver']}, CUDA {torch.version.cuda}"
    else:
        gpu = dict(gpu=None)
        where = f"no GPU (a dry run on {platform.processor() or platform.machine()})"
    results("env", "PASS", f"{where}; Python {platform.python_version()}; "
            + ", ".join(f"{k} {v}" for k, v in versions.items()), python=platform.python_version(),
            versions=versions, **gpu)

    sys.path.insert(0, str(REPO / "install"))
    from verify_requirements import installed_versions, project_requirements, unmet

    name, requirements = project_requirements(REPO / "pyproject.toml")
    problems = unmet(name, requirements, installed_versions())
    results("requirements", not problems, "; ".join(problems) + " (install/README.md: an offline bundle brings them)"
            if problems else f"fatscale's {len(requirements)} requirements met (timm {versions.get('timm')})",
            unmet=problems)


if __name__ == "__main__":
    check_main("env", __doc__, run)
