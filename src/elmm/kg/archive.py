"""Safe extraction of zip and tar (optionally gz/bz2/xz-compressed) archives.

Every member is checked before anything is written: absolute paths, `..` components, symbolic
and hard links, device files and FIFOs are refused with an UnsafeArchiveError naming the archive
and the member. Only regular files and directories are created, by this code (never by
`extractall`), into a temporary directory that replaces the target only when all succeeded.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from elmm.io import atomic_dir

CHUNK = 1 << 20


class UnsafeArchiveError(ValueError):
    """An archive member that could write outside the target or create a link/device."""


def archive_kind(path: str | os.PathLike) -> str | None:
    """"zip", "tar" or None, from the file's content (not its name)."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except OSError:
        pass
    return None


def _safe_parts(archive: Path, name: str) -> tuple[str, ...]:
    """The member's path components, or UnsafeArchiveError if it is absolute or climbs out."""
    def refuse(reason: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(f"{archive}: refusing member {name!r}: {reason}")

    if "\x00" in name:
        raise refuse("NUL byte in the name")
    # Treat backslashes as separators too: a Windows-made archive may use them.
    posix = name.replace("\\", "/")
    if posix.startswith("/") or PurePosixPath(posix).is_absolute() or (len(posix) > 1 and posix[1] == ":"):
        raise refuse("absolute path")
    parts = tuple(p for p in PurePosixPath(posix).parts if p not in ("", "."))
    if ".." in parts:
        raise refuse("path escapes the target directory ('..')")
    return parts


def _target(root: Path, parts: tuple[str, ...], archive: Path, name: str) -> Path:
    dest = root.joinpath(*parts)
    # Defence in depth: no component may resolve outside the root (no links exist there, but check anyway).
    if not dest.resolve().is_relative_to(root.resolve()):
        raise UnsafeArchiveError(f"{archive}: refusing member {name!r}: path escapes the target directory")
    return dest


def _copy(src, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        shutil.copyfileobj(src, out, CHUNK)


def _check_tar(archive: Path, members: list[tarfile.TarInfo]) -> None:
    for m in members:
        _safe_parts(archive, m.name)
        if m.issym() or m.islnk():
            kind = "symbolic" if m.issym() else "hard"
            raise UnsafeArchiveError(f"{archive}: refusing member {m.name!r}: {kind} link to {m.linkname!r}")
        if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
            raise UnsafeArchiveError(f"{archive}: refusing member {m.name!r}: device file or FIFO")
        if not (m.isfile() or m.isdir()):
            raise UnsafeArchiveError(f"{archive}: refusing member {m.name!r}: not a regular file or directory")


def _zip_mode(info: zipfile.ZipInfo) -> int:
    # Unix permissions live in the high 16 bits when the archive was made on a Unix system.
    return (info.external_attr >> 16) if info.create_system == 3 else 0


def _check_zip(archive: Path, infos: list[zipfile.ZipInfo]) -> None:
    for info in infos:
        _safe_parts(archive, info.filename)
        mode = _zip_mode(info)
        if mode and stat.S_ISLNK(mode):
            raise UnsafeArchiveError(f"{archive}: refusing member {info.filename!r}: symbolic link")
        # Many zip writers store permission bits only (file type 0): that is a plain file.
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchiveError(f"{archive}: refusing member {info.filename!r}: not a regular file or directory")
        if info.flag_bits & 0x1:
            raise UnsafeArchiveError(f"{archive}: refusing member {info.filename!r}: encrypted")


def _write_members(root: Path, archive: Path, members) -> None:
    """Write checked members (name, is_dir, open) under `root`; every path is re-checked on the way."""
    for name, is_dir, open_member in members:
        parts = _safe_parts(archive, name)
        if not parts:
            continue
        dest = _target(root, parts, archive, name)
        if is_dir:
            dest.mkdir(parents=True, exist_ok=True)
        else:
            with open_member() as src:
                _copy(src, dest)


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Extract `archive` (zip or tar) into `target`, which it replaces atomically; returns `target`.

    Raises UnsafeArchiveError for an unsafe member (nothing is extracted then) and ValueError when
    the file is not a zip or tar archive.
    """
    archive, target = Path(archive), Path(target)
    kind = archive_kind(archive)
    if kind is None:
        head = b""
        if archive.is_file():
            with open(archive, "rb") as f:
                head = f.read(512).lstrip().lower()
        hint = ""
        if head.startswith((b"<!doctype", b"<html")):
            hint = (" (it looks like an HTML page: file hosts such as Google Drive serve a web page, not the file; "
                    "use a direct link or download it by hand and give its local path)")
        raise ValueError(f"{archive}: not a zip or tar archive{hint}")
    with atomic_dir(target) as tmp:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                _check_zip(archive, infos)  # all members first: refuse before writing anything
                _write_members(tmp, archive, [(i.filename, i.is_dir(), lambda i=i: zf.open(i)) for i in infos])
        else:
            # "r:*" reads plain, gz, bz2 and xz tars; one pass over the members list, then reads.
            with tarfile.open(archive, "r:*") as tf:
                members = tf.getmembers()
                _check_tar(archive, members)  # regular files and directories only from here on
                _write_members(tmp, archive, [(m.name, m.isdir(), lambda m=m: tf.extractfile(m)) for m in members])
    return target
