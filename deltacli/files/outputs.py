"""Output directories that are never half-written, never someone else's, never left behind.

Every command that writes a directory fills a hidden sibling `.NAME.tmp-PID-TAG` and renames
it into place only when it is whole, with a marker file saying deltacli wrote it. So:

- a crash, Ctrl-C or kill leaves no `NAME` that looks complete;
- `--overwrite` replaces only a directory with that marker: never a user's own folder;
- the owner's PID in the scratch name tells a later run which scratch folders are stale
  (their process is gone) and may be removed, except one holding a training checkpoint,
  which `deltacli train --resume NAME` continues.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from deltacli.errors import DeltacliError

MARKER = ".deltacli.json"
CHECKPOINTS = "checkpoints"  # inside a training run's scratch folder


def notice_on(console: Console | None) -> Callable[[str], None]:
    """Notices (what was cleaned up, what was kept) as yellow lines on `console`."""
    if console is None:
        return lambda line: None
    return lambda line: console.print(f"[yellow]{escape(line)}[/]")


def check_output(target: Path, overwrite: bool) -> None:
    """Fail before any work if `target` may not be written: it exists and `--overwrite` was
    not given or it is not deltacli's, it is a file, a broken link, or its file system
    refuses writes."""
    if target.is_symlink() and not target.exists():
        raise DeltacliError(
            f"output {target} is a symbolic link that leads nowhere (a missing target or a "
            "loop); remove it or choose another path"
        )
    if target.exists() and not target.is_dir():
        raise DeltacliError(f"output {target} is a file, not a directory; choose another path")
    if target.exists() and not overwrite:
        raise DeltacliError(f"output directory {target} exists; pass --overwrite to replace it")
    if target.exists() and not (target / MARKER).is_file():
        raise DeltacliError(
            f"{target} was not written by deltacli (it has no {MARKER}), so --overwrite will "
            "not replace it; choose another output path"
        )
    parent = _existing_ancestor(target.parent)
    if not parent.is_dir():
        raise DeltacliError(f"cannot write {target}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DeltacliError(f"cannot write {target}: {parent} is read-only")


def check_apart(target: Path, inputs: list[tuple[str, Path | str]]) -> None:
    """Refuse an output that is, or holds, one of the command's inputs (by role: "base
    model", "delta"): replacing it would delete what the command reads."""
    out = target.resolve()
    for role, source in inputs:
        path = Path(source)
        if not path.exists():
            continue  # a hub id or `default`: nothing of the user's on disk there
        path = path.resolve()
        if out == path or out in path.parents:
            raise DeltacliError(
                f"output {target} would overlap the {role} {source}, which this command "
                "reads; choose another output path"
            )


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@dataclasses.dataclass
class Scratch:
    """The hidden sibling a command fills before it becomes `target`."""

    target: Path
    path: Path
    overwrite: bool = False  # whether `target` may be replaced when this one is whole

    @classmethod
    def create(cls, target: Path, overwrite: bool, notice: Callable[[str], None]) -> Scratch:
        check_output(target, overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(target, notice)
        path = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return cls(target, path, overwrite)

    @classmethod
    def adopt(cls, target: Path, path: Path, overwrite: bool) -> Scratch:
        """Take over an earlier run's scratch folder (to resume it): it is renamed to carry
        this process's PID, so no other run takes it for stale."""
        tag = path.name.rsplit("-", 1)[-1]
        mine = path.with_name(f".{target.name}.tmp-{os.getpid()}-{tag}")
        if mine != path:
            path.rename(mine)
        return cls(target, mine, overwrite)

    def publish(self, what: str) -> None:
        """Mark the folder as deltacli's and rename it into place, replacing an old `target`
        only now that the new one is whole, and only if that was allowed: another command
        may have written `target` while this one ran."""
        (self.path / MARKER).write_text(json.dumps({"written_by": "deltacli", "what": what}))
        _default_permissions(self.path)
        if self.target.is_symlink() or self.target.exists():
            if not self.overwrite or not (self.target / MARKER).is_file():
                self._set_aside(f"{self.target} was written by another command meanwhile")
            old = self.path.with_name(self.path.name.replace(".tmp-", ".old-", 1))
            self.target.rename(old)
            self.path.rename(self.target)
            _remove(old)
            return
        try:
            self.path.rename(self.target)  # fails if another command made it just now
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise
            self._set_aside(f"{self.target} was written by another command meanwhile")

    def _set_aside(self, why: str) -> None:
        """Keep the finished result under a visible name of its own, and say where."""
        kept = self.target.with_name(f"{self.target.name}-{self.path.name.rsplit('-', 1)[-1]}")
        self.path.rename(kept)
        raise DeltacliError(f"{why}; this result was saved to {kept} instead, nothing replaced")

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _remove(path: Path) -> None:
    """Remove a replaced output: the link itself where it was a symlink (never its target)."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(
    target: Path,
    overwrite: bool = False,
    what: str = "output",
    notice: Callable[[str], None] = lambda line: None,
) -> Iterator[Path]:
    """Yield a scratch folder to fill; it becomes `target` only if the block succeeds."""
    scratch = Scratch.create(target, overwrite, notice)
    try:
        yield scratch.path
    except BaseException:
        scratch.discard()
        raise
    scratch.publish(what)


def scratch_folders(target: Path) -> list[Path]:
    """Every scratch (and half-replaced old) folder of `target`, by deltacli's naming."""
    if not target.parent.is_dir():
        return []
    prefixes = (f".{target.name}.tmp-", f".{target.name}.old-")
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefixes))


def owner_alive(folder: Path) -> bool:
    """Whether the process named in a scratch folder's name still runs."""
    try:
        pid = int(folder.name.rsplit("-", 2)[-2])
    except (IndexError, ValueError):
        return False  # not our naming (an older deltacli): nobody owns it
    if pid == os.getpid():
        return False  # a run of this very process, which has ended (one runs at a time)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def has_checkpoint(folder: Path) -> bool:
    if folder.is_symlink():
        return False
    return (folder / CHECKPOINTS).is_dir() and any((folder / CHECKPOINTS).glob("step-*"))


def remove_stale(target: Path, notice: Callable[[str], None]) -> None:
    """Remove the scratch folders of `target` whose process is gone, and say so; keep (and
    point at) those holding a checkpoint that `--resume` can continue."""
    removed, freed = 0, 0
    for folder in scratch_folders(target):
        if owner_alive(folder):
            continue
        if has_checkpoint(folder):
            notice(
                f"kept {folder.name}: it holds a checkpoint of an interrupted run; continue it "
                f"with: deltacli train --resume {target}"
            )
            continue
        if not folder.is_symlink():
            freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        _remove(folder)
        if folder.is_symlink() or folder.exists():
            continue  # not ours to remove (permissions): say nothing of it
        removed += 1
    if removed:
        notice(
            f"removed {removed} stale temporary folder(s) of interrupted runs beside {target} "
            f"({freed / 2**20:,.1f} MB)"
        )


def _default_permissions(folder: Path) -> None:
    """Files as the user's umask would make them (safetensors writes 0600 temporaries)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)
