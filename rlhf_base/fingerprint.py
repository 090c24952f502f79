"""Content fingerprints of input files and folders, hashed once and then cached by size and mtime.

A sweep cell is identified by everything its result depends on, the files it reads included: pi_ref's
weights, the reward model, prompts, preference pairs. Their names are not enough, since the pipeline retrains
its reward model into the same folder. Hashing a model costs about a second per GB, so each file's hash is
cached with the size, modification and change times and inode it was computed at, and reused while all
four are unchanged: a rewrite in place changes the ctime (which, unlike the mtime, cannot be set back), an
atomic rewrite the inode, and either is hashed again.

    fingerprint = Fingerprints(run_dir / "inputs.json")
    fingerprint("runs/default/reward_model")   # 'sha256:...' of every file under it, names included
    fingerprint.save()
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from rlhf_base.io import atomic_write

__all__ = ["Fingerprints"]

_CHUNK = 1 << 20


class Fingerprints:
    """`fingerprint(path)`: the SHA-256 of a file's bytes, or of a folder's files (their relative paths and
    bytes; names starting with "." are skipped: lock files, a writer's temporary files).

    Args:
        cache: a JSON file holding the hashes computed so far (None: keep them in memory only). A damaged
            cache is ignored: the files are hashed again.
    """

    def __init__(self, cache: str | Path | None = None) -> None:
        self.cache = None if cache is None else Path(cache)
        self._files: dict[str, list] = {}
        self._changed = False
        if self.cache is not None and self.cache.is_file():
            try:
                files = json.loads(self.cache.read_text())["files"]
                self._files = {k: v for k, v in files.items() if isinstance(v, list) and len(v) == 5}
            except (ValueError, KeyError, TypeError, AttributeError):
                self._files = {}  # a torn or hand-edited cache costs one hashing, nothing else

    def __call__(self, path: str | Path) -> str:
        path = Path(path)
        if path.is_dir():
            digest = hashlib.sha256()
            for name in _files_under(path):
                digest.update(f"{name}\0{self._file(path / name)}\0".encode())
            return f"sha256:{digest.hexdigest()}"
        return f"sha256:{self._file(path)}"

    def _file(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
        cached = self._files.get(key)
        if cached is not None and cached[:4] == stamp:
            return cached[4]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(_CHUNK):
                digest.update(block)
        self._files[key] = [*stamp, digest.hexdigest()]
        self._changed = True
        return digest.hexdigest()

    def save(self) -> None:
        """Write the cache (atomically), if a file was hashed since it was read."""
        if self.cache is not None and self._changed:
            atomic_write(self.cache, json.dumps({"files": self._files}, indent=1, sort_keys=True))
            self._changed = False


def _files_under(folder: Path) -> list[str]:
    """Every regular file under `folder`, as sorted POSIX paths relative to it, hidden names skipped."""
    names = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(root).relative_to(folder)
        names += [(rel / f).as_posix() for f in files if not f.startswith(".") and Path(root, f).is_file()]
    return sorted(names)
