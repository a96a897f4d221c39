import json
import os
import stat

import pytest

from adainfer.files import write_atomic, write_json


def test_files_written_atomically_get_the_usual_permissions(tmp_path):
    path = tmp_path / "r.json"
    write_atomic(path, lambda tmp: open(tmp, "w").write("{}"))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's owner-only 0600
    assert not list(tmp_path.glob(".*tmp"))


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    path = write_json(tmp_path / "sub" / "r.json", {"a": 1})  # makes the folder

    def fail(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_atomic(path, fail)
    assert json.loads(path.read_text()) == {"a": 1}
    assert not list(path.parent.glob(".*tmp"))
