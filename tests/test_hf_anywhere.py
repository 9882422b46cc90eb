"""An export works in every tool that loads transformers models: with ponderlm installed, through the
Auto classes with no `import ponderlm` (the ponderlm-autoregister.pth hook, lm-eval's `hf` model);
without ponderlm, a self-contained export through trust_remote_code, bit for bit as in the package."""

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from ponderlm import _autoregister
from ponderlm.hf import gather
from ponderlm.hf.export import export
from ponderlm.runs.checkpoint import save_checkpoint
from ponderlm.runs.config import RunConfig

from conftest import tiny_model

ROOT = Path(__file__).resolve().parent.parent
SITE = sysconfig.get_paths()["purelib"]
TAU = 0.4  # prunes some slots of the tiny PonderLM-3 (router_init_bias=0)
PTH = "ponderlm-autoregister.pth"


def run_py(code_or_args, cwd, *, isolated=False, env=None):
    """A fresh interpreter of this venv (``-S``: no site processing, so no .pth of any kind runs)."""
    args = code_or_args if isinstance(code_or_args, list) else ["-c", code_or_args]
    e = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(Path(cwd) / "modules"),
         "TRANSFORMERS_VERBOSITY": "error", **(env or {})}  # fmt: skip
    e.pop("PYTHONPATH", None)
    cmd = [sys.executable, *(["-S"] if isolated else []), *args]
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny PonderLM-3 checkpoint in a run directory, exported plainly and self-contained."""
    root = tmp_path_factory.mktemp("anywhere")
    model = tiny_model("ponderlm3", vocab_size=320, dtype=torch.float32)
    from ponderlm.data.tokenizer import Tokenizer

    from fakepkgs import WORDS

    tok = Tokenizer.train_bpe([" ".join(WORDS)] * 20, vocab_size=300)
    tok.save(root / "tokenizer.json")
    ck = save_checkpoint(root / "run", 3, model.state_dict(), None, {"step": 3, "tokens_seen": 768},
                         RunConfig(model=model.cfg), root / "tokenizer.json", keep_last=1)  # fmt: skip
    run = root / "run"
    (run / "metrics.jsonl").write_text(json.dumps({"split": "val", "step": 3, "tokens": 512, "hard_ppl": 321.5}) + "\n")
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(json.dumps({"checkpoint": str(ck), "rows": [
        {"tau": TAU, "task": "sciq", "n": 16.0, "acc": 0.4375, "mean_depth": 1.5}]}))  # fmt: skip
    plain = export(ck, root / "plain", tau=TAU, log=lambda *_: None)
    sc = export(ck, root / "sc", tau=TAU, self_contained=True, log=lambda *_: None)
    return root, ck, plain, sc


# ------------------------------------------------------------------ installed means registered
def test_the_hook_is_installed_and_costs_nothing_until_used(world, tmp_path):
    assert Path(SITE, PTH).is_file(), f"{PTH} missing from {SITE}: reinstall with pip install -e ."
    r = run_py("import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in "
               "('_ponderlm_autoregister', 'ponderlm', 'torch', 'transformers')))", tmp_path)  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.strip() == "['_ponderlm_autoregister']"  # torch, ponderlm and transformers untouched
    r = run_py("import sys, transformers; print('ponderlm' in sys.modules, "
               "'transformers.models.auto.configuration_auto' in sys.modules)", tmp_path)  # fmt: skip
    assert r.returncode == 0 and r.stdout.split() == ["False", "False"], r.stderr


def test_auto_classes_load_an_export_without_import_ponderlm(world, tmp_path):
    _, _, plain, _ = world
    code = f"""
import sys
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
assert "ponderlm" not in sys.modules
assert "ponderlm" in AutoConfig.for_model.__globals__["CONFIG_MAPPING"]  # known, not imported
assert "ponderlm" not in sys.modules
m = AutoModelForCausalLM.from_pretrained({str(plain)!r})
assert "ponderlm" in sys.modules
tok = AutoTokenizer.from_pretrained({str(plain)!r})
print(type(m).__module__, type(m).__name__, m.config.tau)
"""
    r = run_py(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ponderlm.hf.modeling", "PonderLMForCausalLM", str(TAU)]


def test_the_hook_warns_and_never_breaks(tmp_path):
    class NoMapping:
        pass

    _autoregister._warned = False
    with pytest.warns(RuntimeWarning, match="could not register"):
        _autoregister._patch(NoMapping())  # no CONFIG_MAPPING: a warning, no exception
    _autoregister._patch(NoMapping())  # ... and only once
    _autoregister._warned = False
    # ponderlm's classes failing to import: only loading a ponderlm model fails, and says why
    code = """
import sys
sys.modules["ponderlm.hf.modeling"] = None  # an import of it fails
from transformers import AutoConfig
AutoConfig.for_model("gpt2")
try:
    AutoConfig.for_model("ponderlm")
except ImportError as e:
    print(str(e).startswith("ponderlm's transformers classes could not be imported"))
"""
    r = run_py(code, tmp_path)
    assert r.returncode == 0 and r.stdout.split() == ["True"], r.stderr
    r = run_py("import sys; print('_ponderlm_autoregister' in sys.modules)", tmp_path,
               env={"PONDERLM_NO_AUTOREGISTER": "1"})  # fmt: skip
    assert r.stdout.strip() == "False"


def _copy_project(dst: Path) -> Path:
    """The files a build reads, copied (a build writes build/ and egg-info next to them)."""
    dst.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(ROOT / "ponderlm", dst / "ponderlm", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_wheel_and_editable_wheel_carry_the_pth(tmp_path):
    pytest.importorskip("setuptools")
    proj = _copy_project(tmp_path / "proj")
    dist = tmp_path / "dist"
    wheels = []
    for hook in ("build_wheel", "build_editable"):  # one process each, as a build frontend runs them
        code = f"import sys; from setuptools import build_meta as b; print('WHEEL', b.{hook}(sys.argv[1]))"
        r = subprocess.run([sys.executable, "-c", code, str(dist)], cwd=proj, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        wheels.append(dist / r.stdout.split("WHEEL")[-1].strip())
    assert "editable" in wheels[1].name
    for whl in wheels:
        names = zipfile.ZipFile(whl).namelist()
        assert PTH in names, (whl.name, [n for n in names if "/" not in n])  # at the purelib root
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        assert f"{PTH}," in zipfile.ZipFile(whl).read(record).decode()  # uninstalled with the package
    line = zipfile.ZipFile(wheels[0]).read(PTH).decode()
    assert line == Path(SITE, PTH).read_text()  # what the dev install runs is what a wheel installs
    assert len(line.splitlines()) == 1 and line.startswith("import ")


# ------------------------------------------------------------------ lm-eval's hf model on an export
def test_lm_eval_hf_model_on_an_export_equals_the_ponderlm_adapter(tmp_path):
    pytest.importorskip("lm_eval")
    from test_lm_eval import tiny_lm_eval_world

    _, ck, _ = tiny_lm_eval_world(tmp_path, 128)
    exp = export(ck, tmp_path / "hf", tau=TAU, log=lambda *_: None)
    common = ["--tasks", "ponderlm_arc_easy", "--include_path", str(tmp_path / "tasks"), "--limit", "6",
              "--batch_size", "1", "--log_samples"]  # fmt: skip
    hf = run_py(["-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={exp},dtype=float32",
                 "--device", "cpu", *common, "--output_path", str(tmp_path / "out_hf")], tmp_path)  # fmt: skip
    assert hf.returncode == 0, hf.stderr[-3000:]
    ours = run_py(["-m", "ponderlm", "lm-eval", "run", "--model", "ponderlm", "--model_args", f"checkpoint={exp}",
                   f"tau={TAU}", *common, "--output_path", str(tmp_path / "out_pl")], tmp_path)  # fmt: skip
    assert ours.returncode == 0, ours.stderr[-3000:]

    def samples(out):
        (f,) = list(out.rglob("samples_ponderlm_arc_easy_*.jsonl"))
        return {d["doc_id"]: d for d in map(json.loads, f.read_text().splitlines())}

    a, b = samples(tmp_path / "out_hf"), samples(tmp_path / "out_pl")
    assert len(a) == 6 and a.keys() == b.keys()
    for doc in a:
        assert a[doc]["acc"] == b[doc]["acc"], doc
        la = [float(r[0][0]) for r in a[doc]["resps"]]
        lb = [float(r[0][0]) for r in b[doc]["resps"]]
        assert la == pytest.approx(lb, rel=1e-4, abs=1e-4), doc


# ------------------------------------------------------------------ self-contained, no ponderlm
# drives a loaded model the same way in the package and in the interpreter without ponderlm: a full
# forward, greedy generate, and three decoding steps through the cache by hand (depths of decoded tokens)
DRIVE = """
def drive(m, ids, mask):
    with torch.no_grad():
        fwd = m(ids, attention_mask=mask, use_cache=False)
        gen = m.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        step = m(ids, attention_mask=mask, use_cache=True)
        full, steps = mask, []
        for _ in range(3):
            cache = step.cache if hasattr(step, "cache") else step.past_key_values
            nxt = step.logits[:, -1:].argmax(-1)
            full = torch.cat([full, torch.ones_like(nxt)], 1)
            step = m(nxt, attention_mask=full, cache=cache, use_cache=True)
            steps.append((step.logits, step.depth))
    return fwd, gen, steps
"""

REMOTE = (
    """
import sys
sys.path.append(sys.argv[3])  # site-packages, without running its .pth files
try:
    import ponderlm
except ImportError:
    pass
else:
    raise SystemExit("ponderlm is importable here")
import torch
from transformers import AutoModelForCausalLM
"""
    + DRIVE
    + """
export, out = sys.argv[1], sys.argv[2]
ids, mask = torch.load(out + "/ids.pt")
m = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32)
fwd, gen, steps = drive(m, ids, mask)
mods = sorted(k.rsplit(".", 1)[-1] for k in sys.modules if k.startswith("transformers_modules."))
torch.save({"logits": fwd.logits, "depth": fwd.depth, "tokens": gen, "steps": steps, "modules": mods,
            "ponderlm_loaded": "ponderlm" in sys.modules, "class": type(m).__module__}, out + "/remote.pt")
"""
)


def _reference(export_dir, ids, mask):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)  # the installed package's classes
    assert type(m).__module__ == "ponderlm.hf.modeling"
    namespace = {"torch": torch}
    exec(DRIVE, namespace)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the interpreter without ponderlm (OMP_NUM_THREADS=1): matmuls split alike
    try:
        return namespace["drive"](m, ids, mask)
    finally:
        torch.set_num_threads(threads)


def test_self_contained_export_without_ponderlm_is_bit_identical(world, tmp_path):
    _, _, _, sc = world
    names = sorted(p.name for p in sc.glob("ponderlm_*.py"))
    assert names == sorted(f"{gather.flat_name(m)}.py" for m in gather.gathered_modules())
    cfg = json.loads((sc / "config.json").read_text())
    assert cfg["auto_map"] == gather.auto_map() and cfg["tau"] == TAU
    ids = torch.randint(1, 320, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    torch.save((ids, mask), tmp_path / "ids.pt")
    (tmp_path / "remote.py").write_text(REMOTE)
    r = run_py([str(tmp_path / "remote.py"), str(sc), str(tmp_path), SITE], tmp_path, isolated=True)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "remote.pt")
    assert not got["ponderlm_loaded"] and got["class"].startswith("transformers_modules.")
    # what ran is gathered code: every module the remote model imported is one of the export's files
    loaded = {f"{m}.py" for m in got["modules"] if m.startswith("ponderlm_")}
    assert "ponderlm_hf_modeling.py" in loaded and loaded <= set(names)
    fwd, gen, steps = _reference(sc, ids, mask)
    assert torch.equal(got["logits"], fwd.logits)
    assert torch.equal(got["depth"], fwd.depth) and len(fwd.depth[mask.bool()].unique()) > 1  # pruned at tau
    assert torch.equal(got["tokens"], gen)
    for (la, da), (lb, db) in zip(got["steps"], steps, strict=True):
        assert torch.equal(la, lb) and torch.equal(da, db)


def test_gathered_modules_are_the_closure_of_the_modeling_imports():
    """An independent walk over the package's sources: the modules the modeling module imports, at any
    depth, are exactly the gathered ones, and the gathered files import nothing else of ponderlm."""
    import importlib.util

    def ponderlm_imports(module):
        tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ponderlm"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    yield sub if importlib.util.find_spec(node.module).submodule_search_locations is not None \
                        and importlib.util.find_spec(sub) is not None else node.module  # fmt: skip
            elif isinstance(node, ast.Import):
                yield from (a.name for a in node.names if a.name.startswith("ponderlm"))

    seen, todo = set(), ["ponderlm.hf.modeling"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(ponderlm_imports(m))
    assert sorted(seen) == gather.gathered_modules()
    files = gather.gather()
    assert set(files) == {f"{gather.flat_name(m)}.py" for m in seen}
    for name, text in files.items():
        for rel, absolute in _imports(ast.parse(text)):
            assert all(f"{t}.py" in files for t in rel), (name, rel)
            assert all(a.split(".")[0] in sys.stdlib_module_names or a.split(".")[0] in gather.ALLOWED
                       for a in absolute), (name, absolute)  # fmt: skip


def _imports(tree):
    """(relative targets, absolute modules) of every import statement of a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            yield ([node.module] if node.module else [a.name for a in node.names]), []
        elif isinstance(node, ast.ImportFrom):
            yield [], [node.module]
        elif isinstance(node, ast.Import):
            yield [], [a.name for a in node.names]


def test_gathering_refuses_imports_beyond_torch_and_transformers(monkeypatch, tmp_path):
    from ponderlm.errors import DataError

    bad = tmp_path / "fake_modeling.py"
    bad.write_text("import numpy\nimport yaml\n")
    real = gather._spec

    def spec(name):
        if name == gather.ENTRY:
            import importlib.util

            return importlib.util.spec_from_file_location(name, bad)
        return real(name)

    monkeypatch.setattr(gather, "_spec", spec)
    with pytest.raises(DataError, match=r"imports 'yaml'.*only the standard library, torch and transformers"):
        gather.gather()


# ------------------------------------------------------------------ model card
def test_model_card_reports_what_the_run_recorded(world):
    _, _, plain, sc = world
    card = (sc / "README.md").read_text()
    for fact in ("`ponderlm3`", "| K (max ponder steps) | 2 |", f"| {TAU:g} |", "tokens trained: 768",
                 "optimizer steps: 3", "| hard_ppl | 321.5 |", "| sciq | 0.4 | 16 | 0.4375 |",
                 "trust_remote_code=True"):  # fmt: skip
        assert fact in card, fact
    plain_card = (plain / "README.md").read_text()
    assert "carries no modeling code" in plain_card and "trust_remote_code=True)" not in plain_card
    assert not list(plain.glob("*.py"))


@pytest.mark.slow
def test_self_contained_export_in_a_fresh_venv_with_only_torch_and_transformers(world, tmp_path):
    """A real environment without ponderlm: a new venv with torch, transformers, safetensors and
    tokenizers at this environment's versions (and what they require), nothing else."""
    from importlib.metadata import version

    _, _, _, sc = world
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=600)
    py = venv / "bin" / "python"
    pins = [f"{p}=={version(p).split('+')[0]}" for p in ("torch", "transformers", "safetensors", "tokenizers")]
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", *pins], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    ids = torch.randint(1, 320, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    torch.save((ids, mask), tmp_path / "ids.pt")
    (tmp_path / "remote.py").write_text(REMOTE)
    (tmp_path / "empty").mkdir()
    e = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    e.pop("PYTHONPATH", None)
    r = subprocess.run([str(py), str(tmp_path / "remote.py"), str(sc), str(tmp_path), str(tmp_path / "empty")],
                       cwd=tmp_path, env=e, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "remote.pt")
    assert not got["ponderlm_loaded"]
    fwd, gen, steps = _reference(sc, ids, mask)
    assert torch.equal(got["logits"], fwd.logits) and torch.equal(got["depth"], fwd.depth)
    assert torch.equal(got["tokens"], gen)
    for (la, da), (lb, db) in zip(got["steps"], steps, strict=True):
        assert torch.equal(la, lb) and torch.equal(da, db)
