"""A power cut at every step of an update's swap, and of its rollback, leaves a board that boots one whole
version: the firmware's lib/ota.py and lib/otaboot.py under MicroPython's unix port (swap_cut.py), the
board's flash a directory, each change to it (rename, remove, mkdir, rmdir) cut in turn."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tests.firmware.harness import FIRMWARE_LIB, HERE

OLD = {"main.py": "print('main 1')\n", "lib/app.py": "VERSION = 1\n", "lib/gone.py": "kept by 2\n",
       "version.txt": "1"}
NEW = {"main.py": "print('main 2')\n", "lib/app.py": "VERSION = 2\n", "lib/added.py": "new in 2\n",
       "version.txt": "2"}


def prepare(board: Path) -> None:
    """A board running 1 with 2 downloaded and verified in ota_new/, as lib/ota.py leaves it."""
    for name, text in OLD.items():
        (board / name).parent.mkdir(parents=True, exist_ok=True)
        (board / name).write_text(text)
    files = []
    for name, text in sorted(NEW.items()):
        staged = board / "ota_new" / name
        staged.parent.mkdir(parents=True, exist_ok=True)
        staged.write_text(text)
        files.append([name, len(text), hashlib.sha256(text.encode()).hexdigest()])
    (board / "ota_state.json").write_text(json.dumps({"v": "2", "files": files}))


def flash(board: Path) -> dict[str, str]:
    names = set(OLD) | set(NEW)
    return {name: (board / name).read_text() for name in names if (board / name).exists()}


def whole(contents: dict[str, str], version: dict[str, str]) -> bool:
    expected = dict(version)
    if version is NEW:
        expected["lib/gone.py"] = OLD["lib/gone.py"]      # an update leaves the files it does not name
    return contents == expected


def test_power_cut_at_every_step_of_the_swap_and_the_rollback(micropython_unix, tmp_path: Path) -> None:
    path = (FIRMWARE_LIB, HERE)
    outcomes = []
    for cut_at in range(200):
        board = tmp_path / f"swap-{cut_at}"
        board.mkdir()
        prepare(board)
        out = micropython_unix.run(HERE / "swap_cut.py", "swap", str(cut_at), cwd=board, path=path).split()
        contents = flash(board)
        booted = out[-1]
        assert booted in ("1", "2") and whole(contents, OLD if booted == "1" else NEW), (cut_at, out, contents)
        if booted == "2":
            assert (board / "ota_trial.json").exists()        # on trial until the server confirms it
        outcomes.append(booted)
        if out[0] == "done":
            break
    else:
        raise AssertionError("the swap never finished")
    # the marker's file is written whole before anything moves, so every cut above finishes the swap
    assert set(outcomes) == {"2"} and len(outcomes) > 5, outcomes

    # a cut while the marker itself was being written: half a file, so the swap never began
    board = tmp_path / "half-marker"
    board.mkdir()
    prepare(board)
    (board / "ota_swap.json.new").write_text('{"version": "2", "prev": "1", "files": ["main.py", "li')
    out = micropython_unix.run(HERE / "swap_cut.py", "boot", "0", cwd=board, path=path).split()
    assert out[-1] == "1" and whole(flash(board), OLD), (out, flash(board))

    trial_board = tmp_path / f"swap-{len(outcomes) - 1}"
    for cut_at in range(200):
        board = tmp_path / f"rollback-{cut_at}"
        _copy(trial_board, board)
        out = micropython_unix.run(HERE / "swap_cut.py", "rollback", str(cut_at), cwd=board, path=path).split()
        if out[-1] == "2":
            # cut before the rollback was even written down: version 2 boots once more, its boot counted,
            # and the rollback comes at a later boot
            assert whole(flash(board), NEW) and json.loads((board / "ota_trial.json").read_text())["boots"] == 2
            continue
        assert out[-1] == "1" and whole(flash(board), OLD), (cut_at, out, flash(board))
        result = json.loads((board / "ota_result.json").read_text())
        assert result["state"] == "rolled_back" and result["cmd"] == "u.cut-1.s"
        assert not (board / "ota_trial.json").exists()
        if out[0] == "done":
            break
    else:
        raise AssertionError("the rollback never finished")


def _copy(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)
