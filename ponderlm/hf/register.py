"""Register ponderlm with transformers' Auto* classes without importing transformers eagerly.

``import ponderlm`` must not pay for transformers (seconds) when it is not used, yet
``AutoModelForCausalLM.from_pretrained(dir)`` must work after ``import ponderlm`` whichever of
the two was imported first. If transformers is already imported we register now; otherwise a
one-shot import hook registers right after transformers finishes importing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys


def _register() -> None:
    from ponderlm.hf import modeling as hf  # noqa: F401 -- registers on import


class _AfterTransformers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot; find the real spec without us
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module) -> None:
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if "transformers" in sys.modules:
        _register()
    elif importlib.util.find_spec("transformers") is not None and not any(
        isinstance(f, _AfterTransformers) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _AfterTransformers())
