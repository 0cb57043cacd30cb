"""Writing outputs without ever destroying what is not ours.

The rules for writing and replacing outputs live here, once, for every lavie-jax command (it imports nothing from
lavie_jax but `lavie_jax.io.interrupts`):

- An output is built in a hidden sibling (`.NAME.tmp-*`) and renamed into place only once complete: a failed or
  interrupted write leaves nothing behind, and an old output is swapped out only after the new one is finished.
- An existing output is replaced only when the caller asks (`overwrite`, the commands' `--overwrite`) *and* it is
  recognisably ours. A directory is ours when it holds the caller's marker file (an `Ownership`: a JSON file whose
  fields name this project and a known `kind`) and nothing besides the entries that kind is written with; nested
  directories listed in the layout must be ours in the same way. A file is ours when the caller's `FileOwnership`
  recognises it (e.g. metadata we embed). An empty directory holds nothing to lose and may be replaced too.
- Never replaced, whatever `overwrite` says: `/`, the home directory or a directory above it, the working directory
  or a directory above it, mount points, and symbolic links (replacing a link would not do what its user expects).
- Temporary siblings carry a marker (`.lavie-partial.json`, or the name for files) with the pid and host of the
  process that made them. A process killed before it could clean up (SIGKILL, power loss) leaves them behind; a
  later write to the same output removes those whose process is gone, on this host only, and puts back an old
  output that was swapped out but not yet replaced.
- The rename that swaps outputs is never split by an interrupt (`lavie_jax.io.interrupts`, which turns SIGTERM into
  one, so a killed command runs the same clean-up as Ctrl-C).

Checkpoint directories (`lavie_jax.io.checkpoints.CHECKPOINTS`) and, later, training work directories use
`atomic_directory`; exported weight files use `atomic_file`; sampling outputs use the checks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lavie_jax.io.interrupts import uninterrupted

PARTIAL_MARKER = ".lavie-partial.json"
# Files an operating system drops into any folder a user browses; they are nobody's data.
OS_LITTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})

# kind -> {top-level entry: None (written by us, content not inspected) or the kinds a nested directory may have}
Layout = Mapping[str, "tuple[str, ...] | None"]


class OutputPathError(ValueError):
    """An output (or input) path cannot be used as asked; nothing was written. The message names the fix."""


# ------------------------------------------------------------------------------------------------ ownership

@dataclasses.dataclass(frozen=True)
class Ownership:
    """How to recognise a directory this project wrote, and so may replace.

    `marker` is a JSON file inside the directory holding `fields` (e.g. {"format": "lavie-jax"}) and a `kind`;
    `layouts[kind]` lists the top-level entries that kind is written with (anything else is the user's and makes
    the directory not ours). `what` and `writer` name the thing and the command in messages.
    """

    what: str
    writer: str
    marker: str
    fields: Mapping[str, Any]
    layouts: Mapping[str, Layout]

    def write_marker(self, directory: str | os.PathLike, kind: str, **fields: Any) -> dict[str, Any]:
        """Write the marker of a `kind` directory (`fields` added, plus the creation time); returns its content."""
        if kind not in self.layouts:
            raise ValueError(f"unknown {self.what} kind {kind!r}; expected one of {sorted(self.layouts)}")
        content = {**self.fields, "kind": kind,
                   "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **fields}
        (Path(directory) / self.marker).write_text(json.dumps(content, indent=1, default=json_default) + "\n")
        return content

    def why_not(self, path: str | os.PathLike, kinds: tuple[str, ...] | None = None) -> str | None:
        """None if `path` is one of our directories (of one of `kinds`, default any), else the reason it is not."""
        path = Path(path)
        if path.is_symlink():
            return "it is a symbolic link"
        if not path.is_dir():
            return "it is a file" if path.exists() else "it does not exist"
        marker = path / self.marker
        if marker.is_symlink() or not marker.is_file():
            return f"it has no {self.marker}"
        try:
            meta = json.loads(marker.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as e:
            return f"its {self.marker} cannot be read as JSON ({e})"
        if not isinstance(meta, dict):
            return f"its {self.marker} is not a JSON object"
        for key, value in self.fields.items():
            if meta.get(key) != value:
                return f"its {self.marker} was not written by {self.writer} ({key} is {meta.get(key)!r})"
        kind = meta.get("kind")
        allowed = tuple(self.layouts) if kinds is None else kinds
        if kind not in allowed or kind not in self.layouts:
            return f"its {self.marker} has kind {kind!r}, not one of {list(allowed)}"
        layout, foreign = self.layouts[kind], []
        for entry in sorted(path.iterdir()):
            name = entry.name
            if name == self.marker or name in OS_LITTER:
                continue
            if name not in layout or entry.is_symlink():
                foreign.append(name + ("/" if entry.is_dir() and not entry.is_symlink() else ""))
            elif layout[name] is not None:
                reason = self.why_not(entry, layout[name])
                if reason is not None:
                    return f"{name}/ is not ours: {reason}"
        if foreign:
            return f"it holds {_names(foreign)}, which {self.writer} did not write"
        return None


@dataclasses.dataclass(frozen=True)
class FileOwnership:
    """How to recognise a file this project wrote: `recognise(path)` is None for ours, else the reason it is not."""

    what: str
    writer: str
    recognise: Callable[[Path], str | None]

    def why_not(self, path: str | os.PathLike) -> str | None:
        path = Path(path)
        if path.is_symlink():
            return "it is a symbolic link"
        if path.is_dir():
            return "it is a directory"
        if not path.is_file():
            return "it is not a regular file" if path.exists() else "it does not exist"
        return self.recognise(path)


def json_default(value: Any) -> Any:
    """`json.dumps(default=...)` for what configs hold besides JSON types: tuples, sets, numpy scalars."""
    if isinstance(value, (tuple, set)):
        return list(value)
    if hasattr(value, "item"):  # numpy scalars, without importing numpy here
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _names(items: list[str], n: int = 4) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# ------------------------------------------------------------------------------------------------ checks

def absolute(path: str | os.PathLike) -> Path:
    """`path` made absolute with '..' folded (the final component is not resolved: it may be a link)."""
    return Path(os.path.abspath(os.fspath(path)))


def protected_reason(path: str | os.PathLike) -> str | None:
    """Why `path` must never be replaced or deleted, whoever wrote it (None if it may be)."""
    path = absolute(path)
    real = Path(os.path.realpath(path.parent)) / path.name if path.name else Path(path.anchor)
    if real == Path(real.anchor):
        return "it is the root directory"
    try:
        home = Path.home().resolve()
    except (OSError, RuntimeError):  # no HOME and no passwd entry
        home = None
    if home is not None and home == real:
        return "it is your home directory"
    if home is not None and home.is_relative_to(real):
        return "your home directory is inside it"
    cwd = Path.cwd().resolve()
    if cwd == real:
        return "it is the current directory"
    if cwd.is_relative_to(real):
        return "the current directory is inside it"
    if path.is_dir() and not path.is_symlink() and os.path.ismount(path):
        return "it is a mount point"
    return None


def check_location(path: str | os.PathLike, *, flag: str = "--output") -> Path:
    """Check that `path` could be created, creating nothing: every existing ancestor is a directory and the nearest
    existing one is writable. Returns the absolute path; OutputPathError names the problem and `flag`."""
    path = absolute(path)
    for ancestor in path.parents:
        if not (ancestor.exists() or ancestor.is_symlink()):
            continue
        if ancestor.is_symlink() and not ancestor.exists():
            raise OutputPathError(f"{flag} {path}: {ancestor} is a broken symbolic link; fix it or choose another "
                                  f"{flag}")
        if not ancestor.is_dir():
            raise OutputPathError(f"{flag} {path}: {ancestor} is a file, not a directory; choose another {flag}")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise OutputPathError(f"{flag} {path}: cannot write into {ancestor} (permission denied); choose a "
                                  f"writable location for {flag}")
        break
    return path


def _refuse(path: Path, flag: str, reason: str, writer: str, *, protected: bool = False) -> OutputPathError:
    fix = (f", e.g. a new directory inside it ({path / 'lavie-output'})" if protected
           else ", or move or remove it yourself")
    return OutputPathError(f"{flag} {path}: {reason}; {writer} never replaces it, even with --overwrite: choose "
                           f"another {flag}{fix}")


def check_output_directory(path: str | os.PathLike, owner: Ownership, *, overwrite: bool = False,
                           flag: str = "--output") -> bool:
    """Every check on an output directory, before any work: where it goes (`check_location`), that it is not
    protected or a link, and, if it exists, that it is ours (or empty) and `overwrite` is set.

    Returns whether it exists (and so will be replaced). Raises OutputPathError naming the problem and `flag`.
    """
    path = check_location(path, flag=flag)
    reason = protected_reason(path)
    if reason is not None:
        raise _refuse(path, flag, reason, owner.writer, protected=True)
    if path.is_symlink():
        raise _refuse(path, flag, "it is a symbolic link", owner.writer)
    if not path.exists():
        return False
    if not path.is_dir():
        raise _refuse(path, flag, f"it is a file, not a {owner.what}", owner.writer)
    if any(path.iterdir()):
        reason = owner.why_not(path)
        if reason is not None:
            raise _refuse(path, flag, f"it already exists and is not a {owner.what} ({reason})", owner.writer)
    if not overwrite:
        raise OutputPathError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose another "
                              f"{flag}")
    return True


def check_output_file(path: str | os.PathLike, owner: FileOwnership, *, overwrite: bool = False,
                      flag: str = "--output") -> bool:
    """`check_output_directory` for a file output: an existing one must be a regular file `owner` recognises."""
    path = check_location(path, flag=flag)
    if not (path.exists() or path.is_symlink()):
        return False
    reason = owner.why_not(path)
    if reason is not None:
        raise _refuse(path, flag, f"it already exists and is not {owner.what} ({reason})", owner.writer)
    if not overwrite:
        raise OutputPathError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose another "
                              f"{flag}")
    return True


def check_input(path: str | os.PathLike, *, flag: str, directory: bool = False) -> Path:
    """An existing, readable input file (or `directory`); OutputPathError names `flag` otherwise."""
    path = Path(path)
    want = "directory" if directory else "file"
    if not path.exists():
        raise OutputPathError(f"{flag} {path}: no such {want}" +
                              (" (a broken symbolic link)" if path.is_symlink() else ""))
    if directory != path.is_dir():
        raise OutputPathError(f"{flag} {path} is a {'file' if directory else 'directory'}, not a {want}")
    if not os.access(path, os.R_OK | (os.X_OK if directory else 0)):
        raise OutputPathError(f"{flag} {path}: permission denied (cannot read it)")
    return path


# ------------------------------------------------------------------------------------------------ temporaries

def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def _write_partial_marker(directory: Path, output: Path, role: str) -> None:
    (directory / PARTIAL_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": _host(), "role": role,
                                                        "output": output.name}) + "\n")


def pid_alive(pid: Any) -> bool:
    """Whether a process `pid` (an int > 0) runs on this host (as any user)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user
        return True
    return True


def _process_gone(pid: Any, host: Any) -> bool:
    """True only if `pid` on `host` certainly no longer runs: same host, not us, and no such process."""
    if host != _host() or not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    return not pid_alive(pid)


def _remove_partial(directory: Path) -> None:
    """Remove a temporary directory, its marker last, so a clean-up cut short can still be recognised later."""
    for entry in directory.iterdir():
        if entry.name == PARTIAL_MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
    with contextlib.suppress(OSError):
        (directory / PARTIAL_MARKER).unlink()
        directory.rmdir()


def _tmp_file_name(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}@{_host()}"


def clean_stale(output: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of `output` left by killed runs of `atomic_directory` / `atomic_file` (only
    ours, only of processes gone on this host). An old output swapped out but never replaced is put back first.

    Returns the paths removed (or restored from).
    """
    output = absolute(output)
    parent, name = output.parent, output.name
    if not parent.is_dir():
        return []
    file_pattern = re.compile(re.escape(f".{name}.tmp-") + r"(\d+)@(.+)")
    cleaned = []
    for entry in parent.iterdir():
        if not entry.name.startswith((f".{name}.tmp-", f".{name}.old-")) or entry.is_symlink():
            continue
        if entry.is_file():
            m = file_pattern.fullmatch(entry.name)
            if m and _process_gone(int(m.group(1)), m.group(2)):
                with contextlib.suppress(OSError):
                    entry.unlink()
                    cleaned.append(entry)
            continue
        try:
            info = json.loads((entry / PARTIAL_MARKER).read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            continue  # not made by us (or not ours to judge): leave it
        if not isinstance(info, dict) or info.get("output") != name or not _process_gone(info.get("pid"),
                                                                                        info.get("host")):
            continue
        kept = entry / name
        if info.get("role") == "old" and kept.exists() and not (output.exists() or output.is_symlink()):
            os.rename(kept, output)  # the run died between its two renames: its old output is still whole
        _remove_partial(entry)
        cleaned.append(entry)
    return cleaned


def _make_parents(directory: Path, flag: str) -> list[Path]:
    """mkdir -p `directory`; returns the directories created (outermost first) so a failure can remove them."""
    missing = [p for p in (directory, *directory.parents) if not p.exists()][::-1]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"{flag}: cannot create {directory} ({e.strerror or e}); choose another {flag}") from e
    return missing


def _remove_empty(directories: list[Path]) -> None:
    for d in reversed(directories):
        with contextlib.suppress(OSError):
            d.rmdir()  # only if still empty


# ------------------------------------------------------------------------------------------------ atomic writes

@contextlib.contextmanager
def atomic_directory(output: str | os.PathLike, owner: Ownership, *, overwrite: bool = False,
                     flag: str = "--output") -> Iterator[Path]:
    """Yield a fresh hidden sibling of `output` to fill; on success it replaces `output`, on error it is removed.

    `check_output_directory` runs first (so an existing `output` is replaced only if `overwrite` and it is ours),
    and again just before the swap (the output may have changed during a long write). The filled directory must be
    recognisable by `owner` (write its marker), so whatever this writes can be replaced by a later run. The old
    output is moved aside before the new one is renamed in and deleted after, so a crash never leaves neither.
    """
    output = absolute(output)
    clean_stale(output)  # first: it may put back an output a killed run had swapped out
    check_output_directory(output, owner, overwrite=overwrite, flag=flag)
    created = _make_parents(output.parent, flag)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    old = None
    try:
        _write_partial_marker(tmp, output, "tmp")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's private 0700 would outlive the rename
        yield tmp
        (tmp / PARTIAL_MARKER).unlink()
        reason = owner.why_not(tmp)
        if reason is not None:
            raise RuntimeError(f"atomic_directory: the written {owner.what} would not be recognised later "
                               f"({reason}); write its {owner.marker} and only the entries of its kind")
        exists = check_output_directory(output, owner, overwrite=overwrite, flag=flag)
        with uninterrupted():  # a signal meanwhile is raised once the swap is done
            old = _swap_in(tmp, output, exists)
    except BaseException:
        if tmp.exists():
            _write_partial_marker(tmp, output, "tmp")  # if removal is cut short, a later run still knows it
            _remove_partial(tmp)
        _remove_empty(created)
        raise
    finally:
        if old is not None:  # outside the swap: deleting a large old output takes a while, and if a second
            _remove_partial(old)  # signal cuts it short, its marker lets the next run finish the job


def _swap_in(tmp: Path, output: Path, exists: bool) -> Path | None:
    """Rename `tmp` to `output`; an existing `output` is first moved into a marked `.NAME.old-*` sibling, which
    is returned for the caller to delete (a crash in between leaves it for `clean_stale` to put back)."""
    if not exists:
        os.rename(tmp, output)
        return None
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
    _write_partial_marker(old, output, "old")
    os.rename(output, old / output.name)
    try:
        os.rename(tmp, output)
    except BaseException:
        os.rename(old / output.name, output)
        _remove_partial(old)
        raise
    return old


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, owner: FileOwnership, *, overwrite: bool = False,
                flag: str = "--output") -> Iterator[Path]:
    """Yield a hidden temporary sibling of `path` to write; on success it replaces `path`, on error it is deleted.

    The same rules as `atomic_directory`: `check_output_file` before and again at the end, and the written file
    must be one `owner` recognises.
    """
    path = absolute(path)
    clean_stale(path)
    check_output_file(path, owner, overwrite=overwrite, flag=flag)
    created = _make_parents(path.parent, flag)
    tmp = path.with_name(_tmp_file_name(path))
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # named after this process: a leftover of ours (pid reuse), never another run's
    try:
        yield tmp
        reason = owner.recognise(tmp)
        if reason is not None:
            raise RuntimeError(f"atomic_file: the written file would not be recognised as {owner.what} ({reason})")
        check_output_file(path, owner, overwrite=overwrite, flag=flag)
        with uninterrupted():
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _remove_empty(created)
        raise
