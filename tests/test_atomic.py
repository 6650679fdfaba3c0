"""mellum2.atomic and the dispatcher's one-line errors."""
import os
import stat

import pytest

from mellum2 import atomic, cli
from mellum2.errors import DiskError, MellumError, UsageError


def test_write_json_replaces_whole_file(tmp_path):
    p = tmp_path / "a" / "x.json"
    atomic.write_json(p, {"a": 1})
    atomic.write_json(p, {"b": 2})
    assert p.read_text() == '{\n  "b": 2\n}\n'
    assert sorted(os.listdir(p.parent)) == ["x.json"]  # no temporaries left


def test_failed_writer_keeps_old_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "x.txt"
    atomic.write_text(p, "old")
    with pytest.raises(ZeroDivisionError):
        with atomic.atomic_path(p) as tmp:
            tmp.write_text("half")
            1 / 0
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_a_disk_error_naming_the_path(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(DiskError, match="ro/x.txt: permission denied"):
        atomic.write_text(d / "x.txt", "x")


def test_parent_is_a_file_is_a_disk_error(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(DiskError, match="cannot write .*f/x.txt"):
        atomic.write_text(tmp_path / "f" / "x.txt", "x")


def test_atomic_dir_replaces_directory(tmp_path):
    d = tmp_path / "ck"
    with atomic.atomic_dir(d) as t:
        (t / "a").write_text("1")
    with atomic.atomic_dir(d) as t:
        (t / "b").write_text("2")
    assert os.listdir(d) == ["b"] and os.listdir(tmp_path) == ["ck"]


def test_dispatcher_prints_user_errors_as_one_line(monkeypatch, capsys):
    class Mod:
        @staticmethod
        def main(argv):
            raise UsageError("--top-k: expected <= 98304, got 1000000000")

    monkeypatch.setattr(cli.importlib, "import_module", lambda name: Mod)
    assert cli.main(["info", "x"]) == 2
    err = capsys.readouterr().err
    assert err == "mellum2 info: error: --top-k: expected <= 98304, got 1000000000\n"
    assert issubclass(UsageError, MellumError) and issubclass(UsageError, ValueError)
