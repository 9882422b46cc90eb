"""Build hooks beyond pyproject.toml's metadata: install ``ponderlm-autoregister.pth`` at the root
of site-packages, so that every Python process of the environment can load ponderlm's transformers
exports through the Auto classes without ``import ponderlm`` (see ponderlm/_autoregister.py).

A .pth file must sit at the root of site-packages, outside any package, which package data cannot
express. ``build_py`` writes it into the root of the build directory, which becomes the wheel's
purelib root (``pip install .``). For an editable install (``pip install -e .``) setuptools builds
the wheel in a temporary directory that it names as the install directory, and the file is written
there, next to setuptools' own ``__editable__`` .pth.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "ponderlm-autoregister.pth"
# one line, run by site.py at interpreter start: loads ponderlm/_autoregister.py by path without
# importing the ponderlm package (torch); any failure is one warning, never a broken interpreter
PTH_LINE = (
    'import sys; exec("try:\\n'
    " import os\\n"
    " if os.environ.get('PONDERLM_NO_AUTOREGISTER', '') in ('', '0'):\\n"
    "  from importlib.util import find_spec, spec_from_file_location, module_from_spec\\n"
    "  s = find_spec('ponderlm')\\n"
    "  d = s and list(s.submodule_search_locations or ())\\n"
    "  f = d and os.path.join(d[0], '_autoregister.py')\\n"
    "  if f and os.path.isfile(f):\\n"
    "   s = spec_from_file_location('_ponderlm_autoregister', f)\\n"
    "   m = module_from_spec(s)\\n"
    "   s.loader.exec_module(m)\\n"
    "   sys.modules.setdefault('_ponderlm_autoregister', m).install()\\n"
    "except Exception as e:\\n"
    " sys.stderr.write('warning: ponderlm-autoregister.pth: %s: %s\\\\n' % (type(e).__name__, e))\\n"
    '")\n'
)


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        # an editable build: editable_wheel points install_lib at the wheel it is assembling
        target = Path(self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib)
        target.mkdir(parents=True, exist_ok=True)
        (target / PTH).write_text(PTH_LINE, encoding="utf-8")

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            outputs = [*outputs, str(Path(self.build_lib) / PTH)]
        return outputs


setup(cmdclass={"build_py": BuildPyWithPth})
