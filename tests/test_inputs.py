"""Input checks of the library entry points (the command line's are in tests/test_errors_cli.py):
empty batches, seeds, devices, text that is not UTF-8, and arguments refused before a model is
loaded."""

from __future__ import annotations

import pytest
import torch

from ponderlm.device import resolve_device
from ponderlm.errors import ConfigError

from conftest import METHODS, tiny_model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(1, 0), (0, 4), (0, 0)])
def test_empty_input_is_a_clear_value_error(method, shape):
    """Before the check, an empty batch died in a reshape or torch.stack deep inside the model."""
    model = tiny_model(method)
    ids = torch.zeros(shape, dtype=torch.long)
    want = f"input_ids is empty, shape {shape}"
    for mode in ("soft", "hard", "exact"):
        with pytest.raises(ValueError, match=want.replace("(", r"\(").replace(")", r"\)")):
            model(ids, mode=mode)
    with pytest.raises(ValueError, match=r"input_ids is empty"):
        model.generate(ids, 3)


def test_one_token_still_works():
    model = tiny_model("ponderlm3")
    out = model(torch.zeros(1, 1, dtype=torch.long), mode="hard")
    assert out.logits.shape == (1, 1, model.cfg.vocab_size)


def test_generate_seed_range():
    model = tiny_model("vanilla")
    ids = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"):
        model.generate(ids, 2, temperature=1.0, seed=2**64)
    a = model.generate(ids, 4, temperature=1.0, seed=2**63 - 1).tokens
    b = model.generate(ids, 4, temperature=1.0, seed=2**63 - 1).tokens
    assert torch.equal(a, b)


# ------------------------------------------------------------------ devices
@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_resolve_device_with_cuda(two_gpus):
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)  # this torchrun process's GPU
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device(" cpu ") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"device cuda:3 asked for, but this machine has 2 GPU\(s\)"):
        resolve_device("cuda:3")
    with pytest.raises(ConfigError, match=r"device cuda:2 asked for, but this machine has 2 GPU\(s\)"):
        resolve_device("cuda", local_rank=2)


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available on this machine; use cpu"):
        resolve_device("cuda:0")
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(ConfigError, match="device 'mps' is not supported"):
        resolve_device("mps")


def test_load_model_resolves_device_names(monkeypatch, tmp_path):
    """Every command that loads a model (eval, analyze, generate, lm-eval) goes through load_model:
    a device this machine lacks is one ConfigError there, before anything is read."""
    from ponderlm.loading import load_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        load_model(tmp_path / "missing", "cuda")


# ------------------------------------------------------------------ text
def test_utf8_problem_names_the_byte():
    from ponderlm.errors import utf8_problem

    assert utf8_problem("café") is None
    assert utf8_problem(b"caf\xe9".decode("utf-8", "surrogateescape")) == (
        "not valid UTF-8 text (byte 0xe9 at character 3)"
    )
    assert "a lone surrogate" in utf8_problem("a\ud800")


def test_generate_text_refuses_undecodable_prompt():
    import io

    from ponderlm.cli.generate import Settings, generate_text
    from ponderlm.errors import DataError

    with pytest.raises(DataError, match=r"the prompt is not valid UTF-8 text \(byte 0xff at character 0\)"):
        generate_text(None, None, "\udcff", Settings(), io.StringIO())


# ------------------------------------------------------------------ refused before loading a model
@pytest.fixture
def no_loading(monkeypatch):
    import ponderlm.eval.analyze as analyze_mod
    import ponderlm.eval.evaluate as run_mod

    def boom(*a, **k):
        raise AssertionError("loaded a model before refusing the arguments")

    monkeypatch.setattr(run_mod, "load_model", boom)
    monkeypatch.setattr(analyze_mod, "load_model", boom)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": []}, "no task to evaluate"),
        ({"tasks": ["val", "mmlu"]}, "unknown task"),
        ({"taus": []}, "no tau"),
        ({"taus": [float("nan")]}, "tau must be in the open interval"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"ppl_windows": -1}, "ppl_windows must be an integer >= 1, got -1"),
        ({"limit": 0}, "limit must be an integer >= 1, got 0"),
    ],
)
def test_evaluate_checkpoint_checks_arguments_first(no_loading, tmp_path, kwargs, message):
    from ponderlm.errors import UserError
    from ponderlm.eval.evaluate import evaluate_checkpoint

    args = {"tasks": ["val"], "taus": [0.1], "cache_dir": tmp_path} | kwargs
    with pytest.raises(UserError, match=message):
        evaluate_checkpoint(tmp_path, **args)


def test_parse_tasks():
    from ponderlm.errors import DataError
    from ponderlm.eval.evaluate import parse_tasks

    assert parse_tasks(" val, piqa ,val,") == ["val", "piqa"]
    for text in ("", " ", ",", " , ,"):
        with pytest.raises(ConfigError, match="--tasks names no task"):
            parse_tasks(text)
    with pytest.raises(DataError, match="unknown task"):
        parse_tasks("val,mmlu")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"windows": 0}, "windows must be an integer >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"tau": float("inf")}, "tau must be in the open interval"),
        ({"text": "caf\udce9"}, r"the text to visualise is not valid UTF-8 text \(byte 0xe9 at character 3\)"),
    ],
)
def test_analyze_checks_arguments_first(no_loading, tmp_path, kwargs, message):
    from ponderlm.errors import UserError
    from ponderlm.eval.analyze import analyze

    with pytest.raises(UserError, match=message):
        analyze(tmp_path, out=tmp_path / "a", **kwargs)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_convert_max_seq_len_checked_first(tmp_path, bad):
    from ponderlm.hf.convert import convert_from_hf

    with pytest.raises(ConfigError, match="--max-seq-len must be an integer >= 1"):
        convert_from_hf(tmp_path / "missing", tmp_path / "out", max_seq_len=bad)
    assert sorted(tmp_path.iterdir()) == []


def test_a_file_given_twice_is_read_once_and_said(tmp_path):
    """The same file as two arguments, through a glob and a directory, or a symbolic or hard link:
    read once (by device and inode), and the log names it (it used to be dropped without a word)."""
    from ponderlm.data.inputs import find_inputs

    (tmp_path / "c").mkdir()
    f = tmp_path / "c" / "a.jsonl"
    f.write_text('{"text": "x"}\n')
    (tmp_path / "link.jsonl").symlink_to(f)
    (tmp_path / "hard.jsonl").hardlink_to(f)
    cases = [([f, f], "is given more than once"), ([tmp_path / "c", tmp_path / "c" / "*.jsonl"], "more than once"),
             ([f, tmp_path / "link.jsonl"], "the same file as"),
             ([f, tmp_path / "hard.jsonl"], "the same file as")]  # fmt: skip
    for given, said in cases:
        logs: list[str] = []
        texts, _ = find_inputs(given, logs.append)
        assert [t.path.resolve() for t in texts] == [f.resolve()]
        assert len(logs) == 1 and said in logs[0] and "each file is read once" in logs[0], logs
    logs = []
    find_inputs([f], logs.append)
    assert logs == []
