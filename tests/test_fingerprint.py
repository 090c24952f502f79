"""Input files' content hashes (`rlhf_base.fingerprint`): by content, not name or time; cached while a file's
size, mtime, ctime and inode hold; a folder's files and their names, hidden ones skipped; a damaged cache ignored."""

from __future__ import annotations

import hashlib
import os

from rlhf_base.fingerprint import Fingerprints


def test_a_file_is_hashed_by_content_once_and_again_when_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"one\n")
    cache = tmp_path / "inputs.json"
    fingerprint = Fingerprints(cache)
    assert fingerprint(path) == "sha256:" + hashlib.sha256(b"one\n").hexdigest()
    fingerprint.save()
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    again = Fingerprints(cache)
    assert again(path) == fingerprint(path) and str(path) not in opened, "the cached hash, file not read"
    path.write_bytes(b"two\n")  # another size and mtime
    assert again(path) == "sha256:" + hashlib.sha256(b"two\n").hexdigest()
    stat = path.stat()
    path.write_bytes(b"six\n")  # the same size, inode and (set back) mtime: the ctime still moves
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert again(path) == "sha256:" + hashlib.sha256(b"six\n").hexdigest()
    again.save()
    cache.write_text('{"files": {')  # torn
    assert Fingerprints(cache)(path) == "sha256:" + hashlib.sha256(b"six\n").hexdigest()


def test_a_folder_is_hashed_by_its_files_and_their_names_hidden_ones_skipped(tmp_path):
    folder = tmp_path / "reward_model"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "sub" / "config.json").write_text("{}")
    fingerprint = Fingerprints()
    first = fingerprint(folder)
    (folder / ".lock").write_text("123")
    (folder / ".model.x1.tmp.safetensors").write_bytes(b"half")
    assert fingerprint(folder) == first, "lock and temporary files are not content"
    (folder / "sub" / "config.json").rename(folder / "sub" / "other.json")
    assert fingerprint(folder) != first, "a renamed file changes the folder"
    (folder / "sub" / "other.json").rename(folder / "sub" / "config.json")
    assert fingerprint(folder) == first
    (folder / "model.safetensors").write_bytes(b"weightz")
    assert fingerprint(folder) != first
