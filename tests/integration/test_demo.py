"""`batchd demo --root DIR` deletes nothing it did not make (issue 16): a folder it did
not make is refused untouched, and its own folder is reused run after run, as `make demo`
(`--root demo`) does."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchd.testing import cli


def tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under `root` (without following links), with the bytes of files."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() and not p.is_symlink() else None
        for p in sorted(root.rglob("*"))
    }


async def test_a_folder_the_demo_did_not_make_is_refused_and_left_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A real daemon's root: the very names the demo uses, holding a user's results.
    root = tmp_path / "batchd-root"
    (root / "outbox" / "reviews").mkdir(parents=True)
    (root / "outbox" / "reviews" / "result.jsonl").write_bytes(b'{"custom_id": "1"}\n')
    (root / "inbox").mkdir()
    (root / "notes.txt").write_text("mine")
    before = tree(root)
    code, _out, err = await cli(capsys, "demo", "--root", str(root))
    assert code == 2
    assert "not made by `batchd demo`" in err and ".batchd-demo" in err
    assert "before the marker" not in err  # a daemon's root is never taken for a demo's
    assert tree(root) == before

    # A demo folder from before the marker: refused too, with a word on it.
    old = tmp_path / "old-demo"
    (old / "emulator").mkdir(parents=True)
    (old / "outbox").mkdir()
    code, _out, err = await cli(capsys, "demo", "--root", str(old))
    assert code == 2 and "a demo folder from before the marker" in err
    assert (old / "emulator").is_dir() and (old / "outbox").is_dir()

    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    code, _out, err = await cli(capsys, "demo", "--root", str(a_file))
    assert code == 2 and "not a folder" in err
    assert a_file.read_text() == "mine"

    # A marked folder whose `inbox` is a link to the user's folder: nothing is deleted.
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / ".batchd-demo").write_text("")
    (marked / "inbox").symlink_to(root / "outbox")
    code, _out, err = await cli(capsys, "demo", "--root", str(marked))
    assert code == 2 and "inbox" in err and "nothing was deleted" in err
    assert tree(root) == before and (marked / "inbox").is_symlink()


async def test_the_demo_takes_an_empty_folder_and_runs_in_it_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "demo"
    root.mkdir()
    code, out, err = await cli(capsys, "demo", "--root", str(root), "--time-scale", "3000")
    assert code == 0, err
    assert (root / ".batchd-demo").is_file()
    first = sorted(p.name for p in (root / "outbox").iterdir())
    assert len(first) == 3 and "outbox" in out
    # The user adds a file of their own beside the demo's; the demo's outbox gets a stray.
    (root / "notes.txt").write_text("mine")
    (root / "outbox" / "stray.txt").write_text("left by the first run")
    code, out, err = await cli(capsys, "demo", "--root", str(root), "--time-scale", "3000")
    assert code == 0, err
    assert (root / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (root / "outbox").iterdir()) == first
