"""The repository's ignore rules never cover a file the repository tracks (a fresh clone's
`git status` and `git add` would otherwise hide changes to it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIT = shutil.which("git") or "git"


def _git(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    # Only the repository's own rules: not this machine's global excludes file.
    return subprocess.run(
        [GIT, "-c", "core.excludesFile=/dev/null", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )


def test_no_tracked_file_is_ignored() -> None:
    tracked = _git("ls-files")
    assert tracked.returncode == 0, tracked.stderr
    files = tracked.stdout.splitlines()
    assert "deploy/compose.yaml" in files and ".gitignore" in files
    listed = _git("ls-files", "--cached", "--ignored", "--exclude-standard")
    assert listed.returncode == 0 and listed.stdout == "", listed.stdout
    # Every rule, checked against every tracked path as if it were new (--no-index).
    matched = _git("check-ignore", "--no-index", "--verbose", "--stdin", stdin="\n".join(files))
    assert matched.returncode == 1 and matched.stdout == "", matched.stdout  # 1: none ignored


def test_the_check_sees_an_ignored_path() -> None:
    """The same check names a path the rules do cover (it can fail)."""
    matched = _git(
        "check-ignore", "--no-index", "--verbose", "--stdin", stdin="x/__pycache__/a.pyc"
    )
    assert matched.returncode == 0 and ".gitignore" in matched.stdout
