"""The modeling code of a self-contained export (``ponderlm export --self-contained``), gathered
from the package's own modules at export time: never a second copy kept by hand.

transformers' remote code is one flat directory of modules that import each other relatively
(``from .name import x``), next to config.json, whose ``auto_map`` names the classes. Starting
at :mod:`ponderlm.hf.modeling`, every ``ponderlm`` module it imports (at any depth, also inside
functions and ``TYPE_CHECKING`` blocks) is copied as ``ponderlm_<dotted_name>.py`` with its
``ponderlm`` imports rewritten to those siblings. A gathered module may import only the standard
library, torch and transformers (and what transformers itself requires); anything else is
refused with the module and line, since an environment without ponderlm may not have it.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from dataclasses import dataclass

from ponderlm._version import __version__
from ponderlm.errors import DataError

ENTRY = "ponderlm.hf.modeling"
PATTERN = "ponderlm_*.py"  # every gathered file's name (owned.DirKind pattern of an export)
# third-party imports a gathered module may have: torch, transformers and transformers' own requirements
ALLOWED = frozenset({"torch", "transformers", "numpy", "safetensors", "huggingface_hub", "tokenizers", "packaging"})


def flat_name(module: str) -> str:
    """``ponderlm.model.config`` -> ``ponderlm_model_config`` (the module's name in the export)."""
    return module.replace(".", "_")


def entry_file() -> str:
    return flat_name(ENTRY) + ".py"


def auto_map() -> dict[str, str]:
    """config.json's ``auto_map`` of a self-contained export."""
    m = flat_name(ENTRY)
    return {"AutoConfig": f"{m}.PonderLMConfig", "AutoModelForCausalLM": f"{m}.PonderLMForCausalLM"}


@dataclass
class _Module:
    name: str
    source: str
    deps: set[str]


def _spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _is_module(name: str) -> bool:
    return _spec(name) is not None


def _is_package(name: str) -> bool:
    spec = _spec(name)
    return spec is not None and spec.submodule_search_locations is not None


def _rewrite_from(node: ast.ImportFrom, where: str, deps: set[str]) -> str:
    """``from ponderlm.a import b, c`` as relative imports of flat siblings (one statement each)."""
    out, names = [], []
    for alias in node.names:
        if alias.name == "*":
            raise DataError(f"{where}: `from {node.module} import *` cannot be gathered")
        bound = alias.asname or alias.name
        sub = f"{node.module}.{alias.name}"
        if _is_module(sub):  # a submodule: the module object under its name
            deps.add(sub)
            out.append(f"from . import {flat_name(sub)} as {bound}")
        elif _is_package(node.module):
            raise DataError(
                f"{where}: imports {alias.name!r} from the package {node.module}'s __init__; "
                "import it from the module that defines it"
            )
        else:
            deps.add(node.module)
            names.append(alias.name + (f" as {bound}" if alias.asname else ""))
    if names:
        out.append(f"from .{flat_name(node.module)} import {', '.join(names)}")
    return "; ".join(out)


def _check_third_party(top: str, where: str) -> None:
    if top in sys.stdlib_module_names or top in ALLOWED:
        return
    raise DataError(
        f"{where}: imports {top!r}, which an environment with only torch and transformers may lack; "
        "a self-contained export's modeling code may import only the standard library, torch and transformers"
    )


def _rewrite(node: ast.Import | ast.ImportFrom, where: str, deps: set[str]) -> str | None:
    """The import statement of flat siblings that replaces ``node``, or None to keep it."""
    if isinstance(node, ast.ImportFrom):
        if node.level:
            raise DataError(f"{where}: relative imports cannot be gathered; import from ponderlm.…")
        top = (node.module or "").split(".")[0]
        if top != "ponderlm":
            _check_third_party(top, where)
            return None
        return _rewrite_from(node, where, deps)
    texts = []
    for alias in node.names:
        top = alias.name.split(".")[0]
        if top != "ponderlm":
            _check_third_party(top, where)
            continue
        if alias.asname is None or not _is_module(alias.name) or _is_package(alias.name):
            raise DataError(f"{where}: write `from ... import` instead of `import {alias.name}`")
        deps.add(alias.name)
        texts.append(f"from . import {flat_name(alias.name)} as {alias.asname}")
    if texts and len(texts) != len(node.names):
        raise DataError(f"{where}: ponderlm and other modules imported in one `import` statement")
    return "; ".join(texts) if texts else None


def _read(name: str) -> _Module:
    spec = _spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise DataError(f"cannot gather {name}: no Python source found")
    if spec.submodule_search_locations is not None:
        raise DataError(f"cannot gather {name}: it is a package")
    with open(spec.origin, encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source, spec.origin)
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    edits: list[tuple[int, int, str]] = []
    deps: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            text = _rewrite(node, f"{spec.origin}:{node.lineno}", deps)
            if text is not None:
                start = offsets[node.lineno - 1] + node.col_offset
                edits.append((start, offsets[node.end_lineno - 1] + node.end_col_offset, text))
    for start, end, text in sorted(edits, reverse=True):
        source = source[:start] + text + source[end:]
    return _Module(name, source, deps)


def gather() -> dict[str, str]:
    """{file name: source} of the modeling code: :data:`ENTRY` and the closure of its ponderlm imports."""
    modules: dict[str, _Module] = {}
    todo = [ENTRY]
    while todo:
        name = todo.pop()
        if name not in modules:
            modules[name] = mod = _read(name)
            todo.extend(sorted(mod.deps - modules.keys()))
    files = {}
    for name, mod in sorted(modules.items()):
        header = (
            f"# {flat_name(name)}.py: ponderlm {__version__}'s module {name}, gathered by `ponderlm export "
            "--self-contained`\n# with its ponderlm imports rewritten to sibling modules. Generated: do not edit.\n"
        )
        source = header + mod.source
        if name == ENTRY:
            # transformers copies the sibling files of remote code that it sees imported as
            # `from .name import`; the module imports (`from . import name`) are listed for it here
            siblings = sorted(flat_name(n) for n in modules if n != ENTRY)
            source += "\n\nif False:  # for transformers: the sibling modules this remote code needs\n" + "".join(
                f"    from .{s} import __name__  # noqa: F401\n" for s in siblings
            )
        files[flat_name(name) + ".py"] = source
    return files


def gathered_modules() -> list[str]:
    """The dotted names :func:`gather` copies (the closure of :data:`ENTRY`'s ponderlm imports)."""
    modules, todo = set(), [ENTRY]
    while todo:
        name = todo.pop()
        if name not in modules:
            modules.add(name)
            todo.extend(_read(name).deps)
    return sorted(modules)
