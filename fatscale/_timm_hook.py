"""``import fatscale`` registers the FAT models with timm without importing timm itself.

Importing timm (and with it torch and torchvision) takes seconds, and most of fatscale's command
lines never need it. So ``import fatscale`` puts this finder first on ``sys.meta_path``: when
torchvision or timm is first imported, it repairs torchvision beside a CPU torch first
(fatscale._torchvision_compat), and right after timm's own module has run it imports
fatscale.models, whose ``@register_model`` entry points then exist before ``import timm`` returns.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys


class _RegisterAfterTimm(importlib.abc.Loader):
    """timm's own loader, then the registration of fatscale's models."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def __getattr__(self, name: str):  # resource readers and the like: timm's loader answers
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        importlib.import_module("fatscale.models")


class _TimmFinder(importlib.abc.MetaPathFinder):
    _repairing = False  # the repair looks torchvision up itself: that lookup is not hooked

    def find_spec(self, name: str, path=None, target=None):
        if name not in ("torchvision", "timm") or self._repairing:
            return None
        from fatscale._torchvision_compat import ensure_torchvision_importable

        self._repairing = True
        try:
            ensure_torchvision_importable()  # before torchvision's registrations run (timm imports it)
        finally:
            self._repairing = False
        if name == "torchvision":
            return None  # the usual finders import it
        sys.meta_path.remove(self)  # timm is imported once
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterTimm(spec.loader)
        return spec


def register_when_timm_is_imported() -> None:
    if "timm" in sys.modules:
        importlib.import_module("fatscale.models")
    elif not any(isinstance(finder, _TimmFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TimmFinder())
