"""A built dataset, read: its ``meta.json`` (:func:`load_meta`, checked strictly), its files
(:func:`check_dataset`: shard sizes, shard checksums cached by file identity in ``.verified.json``,
the tokenizer) and a summary table. The format written by :mod:`.prepare` and :mod:`.synthetic`
(through :mod:`.build`); read by :mod:`.batches`, training and evaluation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path

import numpy as np

from ponderlm.data.tokenizer import Tokenizer, read_tokenizer_file
from ponderlm.errors import DataError, OwnershipError
from ponderlm.owned import DirKind, atomic_write, read_small_json

FORMAT_VERSION = 1
TRAIN, VAL = "train", "val"
DTYPES = ("uint16", "uint32")
VERIFIED = ".verified.json"  # (file, size, mtime_ns, inode, sha256) of shards whose checksum was verified
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a plain file name inside the dataset
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _listed_shards(directory: Path) -> set[str]:
    """The shard files a dataset's meta.json lists: token shards, and the per-token label shards of a
    synthetic dataset (nothing if meta.json is missing or malformed)."""
    meta = read_small_json(directory / "meta.json")
    names: set[str] = set()
    if not isinstance(meta, dict):
        return names
    labels = meta.get("labels")
    for splits in (meta.get("splits"), labels.get("splits") if isinstance(labels, dict) else None):
        for split in splits.values() if isinstance(splits, dict) else []:
            for sh in split.get("shards", []) if isinstance(split, dict) else []:
                if isinstance(sh, dict) and isinstance(sh.get("file"), str):
                    names.add(sh["file"])
    return names


def _dataset_before_markers(directory: Path) -> bool:
    meta = read_small_json(directory / "meta.json")
    return isinstance(meta, dict) and {"format_version", "fingerprint", "splits"} <= set(meta)


DATASET = DirKind("dataset", "a dataset", frozenset({"meta.json", "tokenizer.json", VERIFIED}),
                  listed=_listed_shards, legacy=_dataset_before_markers)  # fmt: skip


def summary_table(meta: dict) -> str:
    splits = sorted(meta["splits"])
    head = "| source | " + " | ".join(f"{s} docs | {s} tokens" for s in splits) + " |"
    rows = [head, "|---|" + "---:|---:|" * len(splits)]
    for name, info in meta["sources"].items():
        cells = []
        for s in splits:
            c = info["counts"].get(s, {"documents": 0, "tokens": 0})
            cells.append(f"{c['documents']:,} | {c['tokens']:,}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    docs = {s: sum(i["counts"].get(s, {}).get("documents", 0) for i in meta["sources"].values()) for s in splits}
    rows.append("| total | " + " | ".join(f"{docs[s]:,} | {meta['splits'][s]['tokens']:,}" for s in splits) + " |")
    return "\n".join(rows)


# --------------------------------------------------------------- checking
def _damaged(data_dir: Path) -> str:
    # not "--overwrite": without a readable meta.json the shards are not known to be ours to replace
    return f"the dataset is damaged: prepare it again into a new --out, or after removing {data_dir}"


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _meta_problem(meta) -> str | None:
    """What is wrong with a parsed meta.json, as a phrase; None when it is well formed."""
    if not isinstance(meta, dict):
        return f"not a JSON object (found {type(meta).__name__})"
    for key in ("format_version", "fingerprint", "tokenizer", "dtype", "splits"):
        if key not in meta:
            return f"missing key {key!r}"
    if not _is_count(meta["format_version"]) or meta["format_version"] < 1:
        return f"format_version must be a positive integer, got {meta['format_version']!r}"
    if not isinstance(meta["fingerprint"], str):
        return f"fingerprint must be a string, got {meta['fingerprint']!r}"
    if meta["dtype"] not in DTYPES:
        return f"unknown dtype {meta['dtype']!r} (expected {' or '.join(DTYPES)})"
    problem = _tokenizer_meta_problem(meta["tokenizer"], meta["dtype"]) or _splits_problem(
        meta["splits"], meta["tokenizer"]["file"]
    )
    if problem is None and "labels" in meta:
        return _labels_problem(meta["labels"], meta["splits"], meta["tokenizer"]["file"])
    return problem


def _tokenizer_meta_problem(tok, dtype: str) -> str | None:
    """What is wrong with meta.json's ``tokenizer`` entry (for shards of ``dtype``); None when well formed."""
    if not isinstance(tok, dict):
        return "tokenizer must be an object"
    for key in ("file", "vocab_size", "eot_id"):
        if key not in tok:
            return f"missing key 'tokenizer.{key}'"
    if not isinstance(tok["file"], str) or not _SHARD_NAME.fullmatch(tok["file"]):
        return f"tokenizer.file must be a file name inside the dataset, got {tok['file']!r}"
    if not _is_count(tok["vocab_size"]) or tok["vocab_size"] == 0:
        return f"tokenizer.vocab_size must be a positive integer, got {tok['vocab_size']!r}"
    if not _is_count(tok["eot_id"]) or tok["eot_id"] >= tok["vocab_size"]:
        return f"tokenizer.eot_id must be an id below tokenizer.vocab_size, got {tok['eot_id']!r}"
    if dtype == "uint16" and tok["vocab_size"] > 65536:
        return f"dtype uint16 cannot hold the ids of a {tok['vocab_size']}-entry tokenizer"
    return None


def _splits_problem(splits, tok_file: str) -> str | None:
    """What is wrong with meta.json's ``splits``: each a token count that is the sum of its
    shards', every shard file named once (and not the tokenizer's)."""
    if not isinstance(splits, dict) or not splits:
        return "splits must be a non-empty object"
    names: set[str] = {tok_file}
    for name, split in splits.items():
        where = f"splits.{name}"
        if (
            not isinstance(split, dict)
            or not _is_count(split.get("tokens"))
            or not isinstance(split.get("shards"), list)
        ):
            return f"{where} must be an object with a token count and a shards list"
        for i, sh in enumerate(split["shards"]):
            problem = _shard_problem(f"{where}.shards[{i}]", sh, names)
            if problem is not None:
                return problem
        if sum(sh["tokens"] for sh in split["shards"]) != split["tokens"]:
            return f"{where}.tokens ({split['tokens']}) is not the sum of its shards' tokens"
    return None


def _shard_problem(at: str, sh, names: set[str]) -> str | None:
    """What is wrong with one shard entry; its file joins ``names`` (the files listed so far)."""
    if not isinstance(sh, dict):
        return f"{at} must be an object"
    if not isinstance(sh.get("file"), str) or not _SHARD_NAME.fullmatch(sh["file"]):
        return f"{at}.file must be a file name inside the dataset, got {sh.get('file')!r}"
    if sh["file"] in names:
        return f"{at}.file {sh['file']!r} is listed twice"
    names.add(sh["file"])
    if not _is_count(sh.get("tokens")):
        return f"{at}.tokens must be a token count, got {sh.get('tokens')!r}"
    if not isinstance(sh.get("sha256"), str) or not _SHA256.fullmatch(sh["sha256"]):
        return f"{at}.sha256 must be a SHA-256 hex digest, got {sh.get('sha256')!r}"
    return None


def _labels_problem(labels, splits: dict, tok_file: str) -> str | None:
    """What is wrong with the optional ``labels`` entry (``ponderlm data synthetic``): class names,
    and for every split one uint8 label shard per token shard, as long as it, under its own name."""
    if not isinstance(labels, dict):
        return "labels must be an object"
    classes = labels.get("classes")
    if not (isinstance(classes, list) and 0 < len(classes) <= 256 and all(isinstance(c, str) and c for c in classes)
            and len(set(classes)) == len(classes)):  # fmt: skip
        return "labels.classes must be a list of 1 to 256 distinct class names"
    if labels.get("dtype", "uint8") != "uint8":
        return f"labels.dtype must be uint8, got {labels['dtype']!r}"
    if not isinstance(labels.get("splits"), dict) or set(labels["splits"]) != set(splits):
        return f"labels.splits must be an object with the splits of splits ({', '.join(splits)})"
    names = {tok_file} | {sh["file"] for split in splits.values() for sh in split["shards"]}
    for name, split in labels["splits"].items():
        where = f"labels.splits.{name}"
        token_shards = splits[name]["shards"]
        if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
            return f"{where} must be an object with a shards list"
        if len(split["shards"]) != len(token_shards):
            return f"{where} has {len(split['shards'])} shards for the {len(token_shards)} of splits.{name}"
        for i, (sh, tok) in enumerate(zip(split["shards"], token_shards, strict=True)):
            problem = _shard_problem(f"{where}.shards[{i}]", sh, names)
            if problem is None and sh["tokens"] != tok["tokens"]:
                problem = f"{where}.shards[{i}] has {sh['tokens']} labels for {tok['tokens']} tokens"
            if problem is not None:
                return problem
    return None


def load_meta(data_dir: Path) -> dict:
    """The validated meta.json of a prepared dataset; a missing, unreadable or malformed one is a
    one-line DataError naming the file and the problem."""
    data_dir = Path(data_dir)
    p = data_dir / "meta.json"
    if not p.is_file():
        raise DataError(f"{data_dir} is not a prepared dataset (no meta.json); run `ponderlm data prepare` first")
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        problem = "not UTF-8 text"
    except (ValueError, RecursionError) as e:
        problem = f"invalid JSON ({e})" if isinstance(e, ValueError) else "invalid JSON (nested too deeply)"
    except OSError as e:
        raise DataError(f"cannot read {p}: {e.strerror or e}") from None
    else:
        problem = _meta_problem(meta)
        if problem is None and meta["format_version"] > FORMAT_VERSION:
            raise DataError(
                f"{p}: format_version {meta['format_version']} was written by a newer ponderlm (this one reads "
                f"{FORMAT_VERSION}); upgrade ponderlm"
            )
    if problem is not None:
        raise DataError(f"{p}: {problem}; {_damaged(data_dir)}")
    return meta


def _identity(path: Path, sha256: str) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, sha256]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _read_verified(data_dir: Path) -> dict:
    try:
        info = json.loads((data_dir / VERIFIED).read_text())
    except (OSError, ValueError):
        return {}
    files = info.get("files") if isinstance(info, dict) and info.get("version") == 1 else None
    return files if isinstance(files, dict) else {}


def check_dataset(data_dir: str | Path, *, verify_hashes: bool = True, remember: bool = True) -> dict:
    """Check a prepared dataset before it is used; returns its meta or raises DataError (one line).

    - meta.json is well formed (:func:`load_meta`);
    - every shard exists with the size meta.json implies (the label shards of a dataset made by
      ``ponderlm data synthetic`` too, one byte per token);
    - with ``verify_hashes``, every shard's sha256 matches meta.json. A shard verified before is
      not read again while its (size, mtime_ns, inode) are unchanged: the verified identities are
      kept in ``DATA_DIR/.verified.json``, rewritten atomically only when they change, and not
      kept at all when the directory is not writable. With ``remember=False`` nothing is written
      yet: a command that may still refuse (training checks more before it writes anything) calls
      :func:`remember_verified` once it goes ahead;
    - the dataset's tokenizer file exists, loads, and has the vocabulary size and end-of-text id
      meta.json records (checkpoints carry it: without it a run would write unusable ones).
    """
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    problem = _dataset_problem(data_dir, meta, verify_hashes, remember)
    if problem is not None:
        command = "synthetic" if "synthetic" in meta else "prepare"
        raise DataError(
            f"{problem}; rebuild it with `ponderlm data {command} --out {data_dir} --overwrite` and the options it was "
            "made with"
        )
    return meta


_PENDING: dict[str, dict] = {}  # data dir -> shard identities verified by check_dataset(remember=False)


def remember_verified(data_dir: str | Path) -> None:
    """Record the shards :func:`check_dataset` verified with ``remember=False``, if they are still
    exactly the files it hashed (same size, mtime and inode)."""
    data_dir = Path(data_dir)
    identity = _PENDING.pop(str(data_dir.resolve()), None)
    if identity is None or identity == _read_verified(data_dir):
        return
    for name, (size, mtime, ino, _sha) in identity.items():
        try:
            st = (data_dir / name).stat()
        except OSError:
            return
        if [st.st_size, st.st_mtime_ns, st.st_ino] != [size, mtime, ino]:
            return  # changed since it was hashed: check it again next time
    with contextlib.suppress(OwnershipError):
        atomic_write(data_dir / VERIFIED, json.dumps({"version": 1, "files": identity}) + "\n")


def _dataset_problem(data_dir: Path, meta: dict, verify_hashes: bool = True, remember: bool = True) -> str | None:
    """What is wrong with the files of a dataset whose meta.json is valid, as a phrase naming the
    file; None when it is intact. Cheap checks first (sizes, the tokenizer), then checksums; the
    verification cache is written only when everything passed (a failed check changes nothing).
    An unreadable file raises (that is no damage a rebuild fixes)."""
    shards = [sh for split in meta["splits"].values() for sh in split["shards"]]
    label_splits = meta["labels"]["splits"] if "labels" in meta else {}
    labels = [sh for split in label_splits.values() for sh in split["shards"]]
    identity: dict[str, list] = {}
    problem = _shard_size_problem(data_dir, shards, np.dtype(meta["dtype"]).itemsize, identity)
    problem = problem or _shard_size_problem(data_dir, labels, 1, identity)  # uint8 label shards
    problem = problem or _tokenizer_file_problem(data_dir, meta["tokenizer"])
    if problem is None and verify_hashes:
        cached = _read_verified(data_dir)
        problem = _checksum_problem(data_dir, shards + labels, identity, cached)
        if problem is None and identity != cached:
            _remember(data_dir, identity, remember)
    return problem


def _shard_size_problem(data_dir: Path, shards: list[dict], itemsize: int, identity: dict) -> str | None:
    """A shard missing or of another size than meta.json implies; fills ``identity`` (file ->
    [size, mtime_ns, inode, sha256]) for those that pass."""
    for sh in shards:
        p = data_dir / sh["file"]
        try:
            st = p.stat()
        except FileNotFoundError:
            return f"{p} is missing (listed in meta.json)"
        except OSError as e:
            raise DataError(f"cannot read {p}: {e.strerror or e}") from None
        expected = sh["tokens"] * itemsize
        if not p.is_file() or st.st_size != expected:
            return f"{p} has {st.st_size:,} bytes, meta.json says {sh['tokens']:,} tokens ({expected:,} bytes)"
        identity[sh["file"]] = [st.st_size, st.st_mtime_ns, st.st_ino, sh["sha256"]]
    return None


def _tokenizer_file_problem(data_dir: Path, entry: dict) -> str | None:
    """The dataset's tokenizer file missing, unreadable, or not the one meta.json describes."""
    tok_path = data_dir / entry["file"]
    if not tok_path.exists():
        return f"{tok_path} is missing: the dataset cannot be used without the tokenizer it was built with"
    try:
        tok = Tokenizer(read_tokenizer_file(tok_path), "file")
    except DataError as e:
        return str(e) if str(e).startswith(str(tok_path)) else f"{tok_path}: {e}"
    if tok.vocab_size != entry["vocab_size"]:
        return f"{tok_path} has {tok.vocab_size} entries, meta.json records {entry['vocab_size']}"
    if tok.eot_id != entry["eot_id"]:
        return f"{tok_path} has end-of-text id {tok.eot_id}, meta.json records {entry['eot_id']}"
    return None


def _checksum_problem(data_dir: Path, shards: list[dict], identity: dict, cached: dict) -> str | None:
    """A shard whose sha256 is not meta.json's; shards verified before (``cached``) in exactly
    their present state (size, mtime, inode) are not read again."""
    for sh in shards:
        p = data_dir / sh["file"]
        if cached.get(sh["file"]) == identity[sh["file"]]:
            continue  # verified before in exactly this state
        try:
            digest = _file_sha256(p)
        except OSError as e:
            raise DataError(f"cannot read {p}: {e.strerror or e}") from None
        if digest != sh["sha256"]:
            return f"{p} was changed after the dataset was built (checksum mismatch with meta.json)"
    return None


def _remember(data_dir: Path, identity: dict, remember: bool) -> None:
    """Keep newly verified identities in the verification cache: now, or with ``remember=False``
    once :func:`remember_verified` is called."""
    if not remember:
        _PENDING[str(data_dir.resolve())] = identity
    else:
        with contextlib.suppress(OwnershipError):  # not writable: checked in full every time
            atomic_write(data_dir / VERIFIED, json.dumps({"version": 1, "files": identity}) + "\n")


def verify(data_dir: Path) -> dict:
    """Check every shard against meta.json (size and sha256) and the tokenizer; returns meta or
    raises DataError. The same as :func:`check_dataset`."""
    return check_dataset(data_dir, verify_hashes=True)
