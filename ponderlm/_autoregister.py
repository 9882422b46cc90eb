"""Make transformers' Auto* classes know ponderlm's model type in every process, at almost no cost.

Installing ponderlm puts ``ponderlm-autoregister.pth`` at the root of site-packages (see setup.py);
at interpreter start its one line runs this file by path (not as ``ponderlm._autoregister``, which
would import the package and torch) and calls :func:`install`. ``import ponderlm`` calls it too.

:func:`install` adds a finder to ``sys.meta_path`` that only watches for
``transformers.models.auto.configuration_auto``; a process that never imports it pays one string
comparison per import. ``import transformers`` alone does not import it (transformers is lazy), so
it costs what it did. When it is imported, ``CONFIG_MAPPING`` gets a *pending* ``ponderlm`` entry:
nothing of ponderlm is imported until transformers looks the model type up (``AutoConfig`` /
``AutoModelForCausalLM.from_pretrained`` of a ponderlm directory). Then ``ponderlm.hf.modeling`` is
imported, and it registers the real config and model classes with transformers' public
``register`` methods, replacing the pending entry.

Nothing here may break an unrelated process: every failure of the hook is reported once as a
warning and the process goes on (without the registration); only loading a ponderlm model when
ponderlm's classes cannot be imported raises (an ImportError that says why).
``PONDERLM_NO_AUTOREGISTER=1`` turns the hook off. This module imports only ``sys`` (and
``warnings`` when it has something to say).
"""

import sys

MODEL_TYPE = "ponderlm"
CONFIG_NAME = "PonderLMConfig"
WATCHED = "transformers.models.auto.configuration_auto"
_warned = False


def _warn(what: str, e: BaseException) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    try:
        import warnings

        warnings.warn(f"ponderlm: {what}: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=3)
    except Exception:  # never let the warning itself fail a process
        pass


class _Pending:
    """Stands for ``PonderLMConfig`` in transformers' config mapping until it is looked up; it
    carries the class name, which is all ``config_class_to_model_type`` reads."""

    __name__ = CONFIG_NAME
    __module__ = "ponderlm.hf.modeling"

    def __repr__(self) -> str:
        return f"<{CONFIG_NAME}, imported from ponderlm on first use>"


PENDING = _Pending()


def _resolve():
    """Import ponderlm's transformers classes (they register themselves) and return the config class."""
    from ponderlm.hf import modeling

    modeling.register()
    return modeling.PonderLMConfig


class _LazyExtra(dict):
    """transformers' ``CONFIG_MAPPING._extra_content`` (a dict of the registered model types) that
    resolves ponderlm's pending entry on first lookup."""

    def __getitem__(self, key):
        value = dict.__getitem__(self, key)
        if value is PENDING:
            try:
                value = _resolve()
            except Exception as e:  # a ponderlm model is being loaded: say why it cannot be
                raise ImportError(f"ponderlm's transformers classes could not be imported ({e})") from e
            dict.__setitem__(self, key, value)
        return value

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def values(self):
        return [self[k] for k in list(self)]

    def items(self):
        return [(k, self[k]) for k in list(self)]


def _patch(module) -> None:
    """Add the pending ``ponderlm`` entry to an imported configuration_auto's CONFIG_MAPPING."""
    try:
        mapping = module.CONFIG_MAPPING
        if MODEL_TYPE in mapping:  # registered already (ponderlm.hf.modeling was imported)
            return
        extra = mapping._extra_content
        if not isinstance(extra, dict):
            raise TypeError(f"CONFIG_MAPPING._extra_content is a {type(extra).__name__}, not a dict")
        if not isinstance(extra, _LazyExtra):
            extra = _LazyExtra(extra)
            mapping._extra_content = extra
        dict.__setitem__(extra, MODEL_TYPE, PENDING)
    except Exception as e:
        _warn("could not register the ponderlm model type with transformers", e)


class _Watcher:
    """A meta-path finder that finds nothing itself: it waits for configuration_auto, lets the other
    finders find it, and patches the module right after it has run."""

    ponderlm_autoregister = True  # recognised by install() whichever copy of this file made it

    def find_spec(self, name, path=None, target=None):
        if name != WATCHED:
            return None
        try:
            _remove_watchers()
            spec = None
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                if find is not None and (spec := find(name, path, target)) is not None:
                    break
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            exec_module = spec.loader.exec_module

            def exec_then_patch(module) -> None:
                exec_module(module)
                _patch(module)

            spec.loader.exec_module = exec_then_patch
            return spec
        except Exception as e:
            _warn("the transformers import hook failed", e)
            return None


def _remove_watchers() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "ponderlm_autoregister", False)]


def install() -> None:
    """Register ponderlm's model type with transformers now (if its Auto classes are imported) or
    as soon as they are; idempotent, never raises."""
    try:
        module = sys.modules.get(WATCHED)
        if module is not None and hasattr(module, "CONFIG_MAPPING"):
            _patch(module)
        elif not any(getattr(f, "ponderlm_autoregister", False) for f in sys.meta_path):
            sys.meta_path.insert(0, _Watcher())
    except Exception as e:
        _warn("could not install the transformers import hook", e)
