"""ipcfw.curve's key files, without processes: `ipcfw keygen --force` writes a new file of
its own user, never through an existing file (another user's, or a link's target)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ipcfw.curve import generate, load_keypair


def test_an_overwrite_replaces_a_symbolic_link_and_leaves_its_target_alone(
        tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("not a key\n")
    target.chmod(0o644)
    path = tmp_path / "me.key"
    path.symlink_to(target)
    keys = generate(str(path), overwrite=True)
    assert target.read_text() == "not a key\n" and target.stat().st_mode & 0o777 == 0o644
    assert not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600
    assert load_keypair(str(path)) == keys
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "me.key", "me.key.pub"]


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file another user's needs root")
def test_an_overwrite_of_another_users_file_leaves_the_secret_to_this_one(
        tmp_path: Path) -> None:
    path = tmp_path / "me.key"
    path.write_text("theirs\n")
    os.chown(path, 4242, 4242)
    generate(str(path), overwrite=True)
    assert (path.stat().st_uid, path.stat().st_mode & 0o777) == (os.getuid(), 0o600)

