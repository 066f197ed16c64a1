"""What identifies a model's weights, for the reference-log-prob cache.

A local folder is identified by the content of its weight and config files. Hashing a 14 GB folder takes a
minute, so each file's hash is kept in a small memo in the cache folder under its path, size and modification
time, and read back while those stay the same. A hub id is identified by the snapshot commit the local hub
cache resolves it to (a new revision is another reference), else by its revision name.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dpokit.models import cache_dir, resolve_model_path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".pt")
MEMO = "file-hashes.json"


def file_hash(path: Path, memo_dir: Path | None = None) -> str:
    """sha256 of `path`'s bytes, from the memo while its path, size and modification time are unchanged."""
    memo_file = (memo_dir or cache_dir()) / MEMO
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        memo = json.loads(memo_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    memo[key] = digest.hexdigest()
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_file.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(memo, indent=0), encoding="utf-8")
    os.replace(tmp, memo_file)  # atomically: processes may hash at the same time
    return memo[key]


def hub_snapshot(repo_id: str, revision: str = "main") -> str:
    """The commit the local hub cache resolves `repo_id` at `revision` to, or the revision's name."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # not a valid repo id, or no hub library: the name is all there is
        cached = None
    if isinstance(cached, str):
        return f"commit {Path(cached).parent.name}"  # .../snapshots/<commit>/config.json
    return f"revision {revision}"


def model_fingerprint(name_or_path: str, memo_dir: Path | None = None) -> str:
    """Identifies the weights a model name loads: a folder's file contents, or a hub id's snapshot."""
    path = Path(resolve_model_path(name_or_path))
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
        parts = [f"{f.name}:{file_hash(f, memo_dir)}" for f in files]
    else:
        parts = [name_or_path, hub_snapshot(name_or_path)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
