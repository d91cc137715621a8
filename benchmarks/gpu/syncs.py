"""Host-GPU synchronizations made while a block runs, counted by where they are made: the implicit
ones torch reports in its sync-debug mode ("warn": ``.item()``, ``.tolist()``, a copy to the host,
``nonzero``...) and explicit ``torch.cuda.synchronize()`` calls (DeepSpeed's throughput timer
makes two a step). Each one stalls the host until the GPU's queue drains. Counting slows the host,
so the timed steps run outside such a block. On a CPU nothing is counted."""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from pathlib import Path


def _site(filename: str, lineno: int) -> str:
    return f"{'/'.join(Path(filename).parts[-2:])}:{lineno}"


class HostSyncs:
    def __init__(self, device):
        self.enabled = device.type == "cuda"
        self.sites: Counter[str] = Counter()

    def __enter__(self) -> "HostSyncs":
        if self.enabled:
            import torch

            self._catching = warnings.catch_warnings(record=True)
            self._caught = self._catching.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            self._synchronize = torch.cuda.synchronize
            torch.cuda.synchronize = self._counted
        return self

    def _counted(self, *args, **kwargs):
        frame = sys._getframe(1)
        while frame.f_back is not None and "accelerator" in frame.f_code.co_filename:  # DeepSpeed's wrapper
            frame = frame.f_back
        self.sites[_site(frame.f_code.co_filename, frame.f_lineno)] += 1
        return self._synchronize(*args, **kwargs)

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        import torch

        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize = self._synchronize
        self._catching.__exit__(*exc)
        for warning in self._caught:
            if "synchroniz" in str(warning.message):
                self.sites[_site(warning.filename, warning.lineno)] += 1
            else:  # not ours: shown as usual
                warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)

    def per_step(self, steps: int) -> float | None:
        return sum(self.sites.values()) / steps if self.enabled else None

    def top(self, steps: int, n: int = 4) -> str:
        if not self.enabled:
            return "not counted on a CPU"
        return ", ".join(f"{site} x{count / steps:g}" for site, count in self.sites.most_common(n)) or "none"
