"""cancermoe.files: the one atomic-write helper (temporary file, fsync, rename, fsync of the folder)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from cancermoe import files
from cancermoe.files import atomic_path, write_files_atomically, write_text_atomically
from cancermoe.train import load_checkpoint, save_checkpoint


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_a_failed_write_leaves_the_old_content_and_no_temporary_file(tmp_path) -> None:
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_the_file_and_its_folder_are_fsynced_before_the_write_counts(tmp_path, monkeypatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", recording_fsync)
    save_checkpoint(tmp_path / "checkpoint.pt", {"round": 3, "weights": torch.ones(2)})
    assert synced == ["file", "folder"]
    synced.clear()
    write_text_atomically(tmp_path / "progress.jsonl", "{}\n")
    assert synced == ["file", "folder"]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["round"] == 3
    assert leftovers(tmp_path) == []


def test_a_secret_has_its_mode_from_the_start(tmp_path) -> None:
    seen_modes: list[int] = []
    with atomic_path(tmp_path / "site.key", mode=0o600) as tmp:
        seen_modes.append(stat.S_IMODE(tmp.stat().st_mode))
        tmp.write_bytes(b"secret")
    assert seen_modes == [0o600]
    assert stat.S_IMODE((tmp_path / "site.key").stat().st_mode) == 0o600


def test_a_pair_is_staged_whole_before_the_first_rename(tmp_path) -> None:
    (tmp_path / "a.pem").write_text("old certificate")
    with pytest.raises(OSError):  # the key's folder does not exist: staging fails before anything is renamed
        write_files_atomically([(tmp_path / "a.pem", b"new certificate", 0o644),
                                (tmp_path / "missing" / "a.key", b"new key", 0o600)])
    assert (tmp_path / "a.pem").read_text() == "old certificate"
    assert leftovers(tmp_path) == []
