"""The two fleetlog trees a before/after comparison runs: a revision or a directory each.

A revision (``main~3``, a sha) is checked out with ``git worktree add
--detach`` into a temporary directory; :meth:`Checkouts.close` removes every
worktree it added, so call it in a ``finally``.  A directory (a worktree, the
current working tree) is taken as it is, uncommitted changes included, but its
``src`` is copied at the start: a tree others work in may change during the
run, and the workers of the drain start long after the gateways.  Either way a
side's processes run its code by having that ``src`` first on ``PYTHONPATH``
(see :func:`bench.runner.child_env`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Checkouts", "RevisionError", "Side", "imported_from"]


class RevisionError(RuntimeError):
    """Raised when a revision or directory cannot be turned into a fleetlog tree."""


@dataclass(frozen=True)
class Side:
    """One side of the comparison: what was asked for, and the tree that runs."""

    name: str  # "before" or "after"
    spec: str  # as given on the command line
    tree: Path  # the worktree or directory
    src: Path  # what runs: the worktree's src, or the copy of the directory's
    commit: str  # full sha of the revision, or of the directory's HEAD ("" if not a git tree)
    changes: tuple[str, ...] = ()  # a directory's uncommitted changes in src (git status lines)

    @property
    def dirty(self) -> bool:
        return bool(self.changes)

    @property
    def short(self) -> str:
        """Short sha, ``+dirty`` when the code that runs differs from it."""
        return (self.commit[:7] or self.tree.name) + ("+dirty" if self.dirty else "")


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          timeout=120, check=False)
    if done.returncode != 0:
        raise RevisionError(f"git {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout.rstrip("\n")  # a status line may start with a space


def _is_fleetlog_tree(path: Path) -> bool:
    return (path / "src" / "fleetlog" / "__init__.py").is_file()


def imported_from(env: dict[str, str], cwd: Path) -> Path:
    """The fleetlog package a child started with ``env`` in ``cwd`` imports."""
    done = subprocess.run([sys.executable, "-c", "import fleetlog; print(fleetlog.__file__)"],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RevisionError(f"import fleetlog failed: {done.stderr.strip()[-1500:]}")
    return Path(done.stdout.strip()).parent


class Checkouts:
    """Resolves sides of ``repo``; owns the temporary worktrees it adds under ``root``."""

    def __init__(self, repo: Path, root: Path) -> None:
        self.repo, self.root = repo, root
        self._added: list[Path] = []

    def side(self, name: str, spec: str) -> Side:
        """A directory holding ``src/fleetlog`` is used as is; anything else is a revision."""
        path = Path(spec).expanduser()
        if path.is_dir() and _is_fleetlog_tree(path):
            tree = path.resolve()
            try:
                commit = _git(tree, "rev-parse", "HEAD")
                changes = tuple(_git(tree, "status", "--porcelain", "--", "src").splitlines())
            except RevisionError:  # not a git tree: still measurable
                commit, changes = "", ()
            src = self.root / name / "src"
            shutil.copytree(tree / "src", src, ignore=shutil.ignore_patterns("__pycache__"))
            return Side(name, spec, tree, src, commit, changes)
        try:
            commit = _git(self.repo, "rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}")
        except RevisionError:
            raise RevisionError(f"{spec!r} is neither a revision of {self.repo} nor a directory "
                                "holding src/fleetlog") from None
        tree = self.root / name
        _git(self.repo, "worktree", "add", "--detach", "--quiet", str(tree), commit)
        self._added.append(tree)
        if not _is_fleetlog_tree(tree):
            raise RevisionError(f"{spec} ({commit[:7]}) has no src/fleetlog")
        return Side(name, spec, tree, tree / "src", commit)

    def close(self) -> list[str]:
        """Remove every worktree added; return what could not be removed."""
        problems = []
        for tree in self._added:
            try:
                _git(self.repo, "worktree", "remove", "--force", str(tree))
            except RevisionError as exc:
                problems.append(f"temporary worktree {tree} not removed: {exc}")
        self._added.clear()
        return problems
