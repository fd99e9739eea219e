"""A file replaced whole or not at all."""

import pytest

from maskrcnn.atomic import atomic_write


def test_atomic_write_replaces_the_file_whole_or_not_at_all(tmp_path):
    path = tmp_path / "notes.txt"
    assert atomic_write(path, lambda tmp: tmp.write_text("old")) == path

    def disk_full(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, disk_full)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    atomic_write(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
