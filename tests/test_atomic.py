"""atomic.py: one publishing policy (temp file, fsync, rename, fsync the directory)."""

import os

import pytest

from tokenratio import atomic


def test_a_file_is_published_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    atomic.write_json(target, {"x": 1})
    atomic.write_jsonl(tmp_path / "b.jsonl", [{"t": "é"}, {"t": 2}])
    assert target.read_text() == '{\n "x": 1\n}'
    assert (tmp_path / "b.jsonl").read_text(encoding="utf-8") == '{"t": "é"}\n{"t": 2}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.jsonl"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    atomic.write_text(target, "old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        atomic.write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_directory_is_published_with_its_marker_replacing_the_old_one(tmp_path):
    final, tmp = tmp_path / "final", tmp_path / "final.tmp"
    final.mkdir()
    (final / "old").write_text("")
    tmp.mkdir()
    (tmp / "weights").write_text("w")
    atomic.publish_dir(tmp, final, marker=atomic.COMPLETE)
    assert sorted(p.name for p in final.iterdir()) == ["COMPLETE", "weights"]
    assert not tmp.exists()


def test_leftovers_are_only_those_of_dead_writers(tmp_path):
    mine = atomic.temporary_name(tmp_path / "shard")
    assert not atomic.is_leftover(mine)  # this process is alive
    dead = tmp_path / f".shard~{mine.name.split('~')[1]}~999999999.tmp"
    assert atomic.is_leftover(dead)
    assert not atomic.is_leftover(tmp_path / "shard.tmp")
