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
    not given or it is not deltacli's, it is a file, or its file system refuses writes."""
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

    @classmethod
    def create(cls, target: Path, overwrite: bool, notice: Callable[[str], None]) -> Scratch:
        check_output(target, overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(target, notice)
        path = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return cls(target, path)

    @classmethod
    def adopt(cls, target: Path, path: Path) -> Scratch:
        """Take over an earlier run's scratch folder (to resume it): it is renamed to carry
        this process's PID, so no other run takes it for stale."""
        tag = path.name.rsplit("-", 1)[-1]
        mine = path.with_name(f".{target.name}.tmp-{os.getpid()}-{tag}")
        if mine != path:
            path.rename(mine)
        return cls(target, mine)

    def publish(self, what: str) -> None:
        """Mark the folder as deltacli's and rename it into place, replacing an old `target`
        only now that the new one is whole."""
        (self.path / MARKER).write_text(json.dumps({"written_by": "deltacli", "what": what}))
        _default_permissions(self.path)
        if self.target.exists():
            old = self.path.with_name(self.path.name.replace(".tmp-", ".old-", 1))
            self.target.rename(old)
            self.path.rename(self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.path.rename(self.target)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


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
        freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(folder, ignore_errors=True)
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
