"""Applying OCI layers onto a directory, safely.

The host is trusted, the image is not. :func:`unpack_layer` reads a layer
once, as a stream: it rejects hostile entries that can be recognised from the
tar alone (absolute names, ``..``, odd hardlinks), applies each whiteout as it
comes (``.wh.NAME`` deletes NAME from lower layers, ``.wh..wh..opq`` empties a
directory's lower contents; what this layer itself wrote is never whited out,
whichever comes first in the tar), extracts every other entry and computes the
uncompressed digest (the layer's diff_id), checked at the end. A layer that
fails leaves its partial writes in the tree it was applied to, which is always
scratch space (``images/rootfs.py``) thrown away with the failure.
:func:`scan_layer` does the checks and the digest without writing anything.

While extracting, each entry's parent is resolved inside the root one
component at a time with ``lstat``; relative symlinks that stay in the root
are followed, anything else that would leave the root raises
:class:`~ember.errors.UnsafeLayer`. The final component is never followed: an
existing entry there is replaced.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from ember.errors import ImageError, UnsafeLayer
from ember.safepath import NotADirectory, PathEscapes, TooManySymlinks, resolve_inside
from ember.util import log

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"

_CHUNK = 1 << 20

LayerSource = Path | BinaryIO


@dataclass(frozen=True)
class LayerScan:
    """What :func:`scan_layer` learned about a layer."""

    diff_id: str  #: sha256 of the uncompressed tar, ``sha256:<hex>``
    size: int  #: uncompressed size in bytes
    entries: int  #: number of tar entries (whiteouts included)
    whiteouts: tuple[tuple[str, ...], ...] = field(default=(), repr=False)
    opaque_dirs: tuple[tuple[str, ...], ...] = field(default=(), repr=False)
    #: Device nodes and FIFOs left out (never created on the host): how many, and the
    #: first few names.
    skipped: int = 0
    skipped_names: tuple[str, ...] = ()


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _HashingReader:
    """A read-only stream wrapper that hashes and counts everything read through it."""

    def __init__(self, inner: _Readable) -> None:
        self._inner = inner
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


def _rewind(source: BinaryIO) -> None:
    try:
        source.seek(0)
    except (AttributeError, OSError) as exc:
        raise ImageError("layer stream must be seekable") from exc


@contextlib.contextmanager
def _decompressed(source: LayerSource, compression: str) -> Iterator[_HashingReader]:
    """Open ``source`` and yield a hashing reader over its uncompressed tar bytes.

    A layer file is decompressed by ``gzip -dc`` / ``zstd -dc`` where installed: on
    another core, while this one parses and writes (a third less time for a gzip
    layer on two cores); streams, and hosts without the tools, decompress here.
    """
    with contextlib.ExitStack() as stack:
        if isinstance(source, Path):
            raw: BinaryIO = stack.enter_context(open(source, "rb"))
        else:
            raw = source
            _rewind(raw)
        tool = _TOOLS.get(compression) if isinstance(source, Path) else None
        if tool is not None and shutil.which(tool[0]) is not None:
            yield from _external(list(tool), raw)
        elif compression == "none":
            yield _HashingReader(raw)
        elif compression == "gzip":
            gz = gzip.GzipFile(fileobj=raw, mode="rb")
            stack.callback(gz.close)
            yield _HashingReader(gz)
        elif compression == "zstd":
            yield from _zstd(raw)
        else:
            raise ImageError(f"unknown layer compression {compression!r}")


#: Decompressors run as processes of their own, by compression.
_TOOLS = {"gzip": ("gzip", "-dc"), "zstd": ("zstd", "-dc", "-q")}


class _ToolFailed(Exception):
    """A decompressor process failed: the layer is corrupt."""


def _external(cmd: list[str], raw: BinaryIO) -> Iterator[_HashingReader]:
    proc = subprocess.Popen(cmd, stdin=raw, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    failed = False
    try:
        reader = _HashingReader(proc.stdout)
        yield reader
        reader.drain()
    except BaseException:
        failed = True
        raise
    finally:
        proc.stdout.close()
        if failed:
            proc.kill()
        err = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
        code = proc.wait()
    if code != 0:
        raise _ToolFailed(err.splitlines()[-1] if err else f"{cmd[0]}: exit status {code}")


def _zstd(raw: BinaryIO) -> Iterator[_HashingReader]:
    import zstandard  # type: ignore[import-not-found, unused-ignore]

    zreader = zstandard.ZstdDecompressor().stream_reader(raw)
    try:
        yield _HashingReader(zreader)
    finally:
        zreader.close()  # type: ignore[no-untyped-call, unused-ignore]


def split_name(name: str) -> tuple[str, ...]:
    """Split a tar entry name into components; reject absolute names and ``..``.

    ``./a//b/`` gives ``("a", "b")``; the root itself gives ``()``.

    Raises:
        UnsafeLayer: the name is absolute or has a ``..`` component.
    """
    if name.startswith("/"):
        raise UnsafeLayer(f"layer entry {name!r} has an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeLayer(f"layer entry {name!r} has a '..' component")
    return parts


def _check_member(m: tarfile.TarInfo) -> None:
    parts = split_name(m.name)
    if m.islnk():
        if m.linkname.startswith("/") or ".." in m.linkname.split("/"):
            raise UnsafeLayer(f"layer entry {m.name!r} is a hardlink to {m.linkname!r}")
        if not split_name(m.linkname):
            raise UnsafeLayer(f"layer entry {m.name!r} is a hardlink to the root")
    elif not (m.isreg() or m.isdir() or m.issym() or _is_special(m)):
        raise ImageError(f"layer entry {m.name!r} has unsupported type {m.type!r}")
    if not parts and not m.isdir():
        raise UnsafeLayer(f"layer entry {m.name!r} replaces the root with a non-directory")


def _corrupt(name: str, exc: BaseException) -> ImageError:
    detail = str(exc) or type(exc).__name__
    return ImageError(f"layer {name} is corrupt: {detail}")


_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, _ToolFailed)


def scan_layer(source: LayerSource, *, compression: str, name: str = "") -> LayerScan:
    """Read a layer without writing anything: check entries, compute its diff_id.

    Args:
        source: a path, or a seekable binary file object (rewound first).
        compression: ``"none"``, ``"gzip"`` or ``"zstd"``.
        name: how to call the layer in errors (its digest); defaults to the path.

    Raises:
        UnsafeLayer: an entry is hostile in itself (see module doc).
        ImageError: the tar or its compression is corrupt or truncated.
    """
    label = name or (str(source) if isinstance(source, Path) else "stream")
    whiteouts: list[tuple[str, ...]] = []
    opaque: list[tuple[str, ...]] = []
    count = 0
    skipped: list[str] = []
    try:
        with _decompressed(source, compression) as reader:
            with tarfile.open(fileobj=reader, mode="r|") as tf:  # type: ignore[call-overload]
                for m in tf:
                    count += 1
                    _check_member(m)
                    if _is_special(m):
                        skipped.append(m.name)
                    parts = split_name(m.name)
                    if parts and parts[-1].startswith(WHITEOUT_PREFIX):
                        base = parts[-1][len(WHITEOUT_PREFIX):]
                        if parts[-1] == OPAQUE_WHITEOUT:
                            opaque.append(parts[:-1])
                        elif base.startswith(WHITEOUT_PREFIX):
                            continue  # other aufs metadata (.wh..wh.plnk...): ignore
                        elif base in ("", ".", ".."):
                            _check_whiteout(parts, m.name)
                        else:
                            whiteouts.append((*parts[:-1], base))
            reader.drain()
    except ImageError:
        raise
    except _READ_ERRORS as exc:
        raise _corrupt(label, exc) from exc
    except OSError as exc:
        if isinstance(source, Path) and exc.filename == str(source):
            raise
        raise _corrupt(label, exc) from exc
    return LayerScan(
        diff_id="sha256:" + reader.hash.hexdigest(),
        size=reader.size,
        entries=count,
        whiteouts=tuple(whiteouts),
        opaque_dirs=tuple(opaque),
        skipped=len(skipped),
        skipped_names=tuple(skipped[:3]),
    )


def _is_special(m: tarfile.TarInfo) -> bool:
    """A device node or FIFO: never made on the host."""
    return m.ischr() or m.isblk() or m.isfifo()


def skipped_message(scan: LayerScan, label: str) -> str:
    """The one line a build says for a layer whose device nodes and FIFOs were skipped."""
    names = ", ".join(scan.skipped_names) + (", ..." if scan.skipped > 3 else "")
    return (f"layer {label}: skipped {scan.skipped} device node(s)/FIFO(s) ({names}); they "
            "are never created on the host, and the guest has its own /dev")


# --- extraction ----------------------------------------------------------------


class _Tree:
    """Path resolution inside ``root`` that never leaves it."""

    def __init__(self, root: Path, label: str) -> None:
        self.root = root
        self.label = label

    def _escape(self, entry: str) -> UnsafeLayer:
        return UnsafeLayer(f"entry {entry!r} traverses a symlink that leaves the image")

    def resolve_dir(self, parts: tuple[str, ...], entry: str, *, create: bool) -> Path | None:
        """Resolve directory ``parts`` (all components followed) to a real host dir.

        Missing directories are created (0755, root) when ``create``; otherwise
        ``None`` is returned for a missing one. A non-directory in the way
        raises ImageError.
        """
        try:
            done = resolve_inside(self.root, parts, create=create, mode=0o755)
        except PathEscapes:
            raise self._escape(entry) from None
        except TooManySymlinks:
            raise UnsafeLayer(f"entry {entry!r}: too many levels of symlinks") from None
        except NotADirectory as exc:
            raise ImageError(
                f"layer {self.label}: entry {entry!r}: {exc.shown!r} is not a directory"
            ) from None
        return None if done is None else self.root.joinpath(*done)


def _remove(path: Path) -> None:
    """Remove whatever is at ``path`` (not following a symlink); nothing if absent."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _set_xattrs(path: Path, m: tarfile.TarInfo) -> None:
    for key, value in m.pax_headers.items():
        if not key.startswith("SCHILY.xattr."):
            continue
        attr = key[len("SCHILY.xattr."):]
        try:
            os.setxattr(path, attr, value.encode("utf-8", "surrogateescape"),
                        follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.EOPNOTSUPP, errno.EINVAL):
                log.debug("skipping xattr %s on %s: %s", attr, path, exc)
                continue
            raise


def _mtime_ns(m: tarfile.TarInfo) -> int:
    return int(m.mtime * 1_000_000_000)


class _Extractor:
    def __init__(self, root: Path, label: str) -> None:
        self.tree = _Tree(root, label)
        self.root = root
        self.as_root = os.geteuid() == 0
        self.dir_times: list[tuple[Path, int]] = []
        #: what this layer wrote (never whited out by it), and every parent of those
        self.written: set[tuple[str, ...]] = set()
        self.parents: set[tuple[str, ...]] = set()
        #: entry parents already resolved to real directories, and every prefix of those
        self._dirs: dict[tuple[str, ...], Path] = {}
        self._dir_prefixes: set[tuple[str, ...]] = set()

    def _parent(self, parts: tuple[str, ...], entry: str) -> Path:
        """The real directory ``parts`` names (created if missing), cached."""
        cached = self._dirs.get(parts)
        if cached is not None:
            return cached
        d = self.tree.resolve_dir(parts, entry, create=True)
        assert d is not None
        self._dirs[parts] = d
        for i in range(len(parts) + 1):
            self._dir_prefixes.add(parts[:i])
        return d

    def _replacing(self, parts: tuple[str, ...]) -> None:
        """``parts`` is about to be replaced or removed: forget cached directories
        through it (rare: only when it is a prefix of one)."""
        if parts in self._dir_prefixes:
            n = len(parts)
            for key in [k for k in self._dirs if k[:n] == parts]:
                del self._dirs[key]
            self._dir_prefixes = {k[:i] for k in self._dirs for i in range(len(k) + 1)}

    def _wrote(self, parts: tuple[str, ...]) -> None:
        self.written.add(parts)
        for i in range(len(parts)):
            self.parents.add(parts[:i])

    def whiteout(self, parts: tuple[str, ...], entry: str) -> None:
        """Apply the whiteout entry ``parts`` (its last component ``.wh.X``)."""
        name = parts[-1]
        if name == OPAQUE_WHITEOUT:
            target = parts[:-1]
            d = self.tree.resolve_dir(target, entry, create=False)
            if d is not None:
                self._replacing(target)
                self._clear_lower(d, target)
            return
        base = name[len(WHITEOUT_PREFIX):]
        if base.startswith(WHITEOUT_PREFIX):
            return  # other aufs metadata (.wh..wh.plnk...): ignore
        target = (*parts[:-1], base)
        if target in self.written:
            return  # this layer's own entry stays
        d = self.tree.resolve_dir(parts[:-1], entry, create=False)
        if d is None:
            return
        self._replacing(target)
        if target in self.parents:  # this layer wrote inside it: keep only that
            self._clear_lower(d / base, target)
        else:
            _remove(d / base)

    def _clear_lower(self, path: Path, parts: tuple[str, ...]) -> None:
        """Remove what lower layers put in directory ``path``, keeping this layer's."""
        try:
            children = os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        for child in children:
            cparts = (*parts, child)
            if cparts in self.written:
                continue
            if cparts in self.parents:
                self._clear_lower(path / child, cparts)
            else:
                _remove(path / child)

    def _chown(self, path: Path, m: tarfile.TarInfo) -> None:
        if self.as_root:
            os.lchown(path, m.uid, m.gid)

    def extract(self, m: tarfile.TarInfo, tf: tarfile.TarFile,
                parts: tuple[str, ...]) -> None:
        if not parts:  # the root directory's own metadata
            self._dir_meta(self.root, m)
            return
        parent = self._parent(parts[:-1], m.name)
        path = parent / parts[-1]
        self._wrote(parts)
        if m.isdir():
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                st = None
            if st is None or not stat.S_ISDIR(st.st_mode):
                self._replacing(parts)
                _remove(path)
                os.mkdir(path, 0o700)
            self._dir_meta(path, m)
            return
        self._replacing(parts)
        if m.islnk():
            self._hardlink(path, m)
            return
        _remove(path)
        if m.isreg():
            src = tf.extractfile(m)
            assert src is not None
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
                if self.as_root:
                    os.fchown(out.fileno(), m.uid, m.gid)
                os.fchmod(out.fileno(), m.mode & 0o7777)
        elif m.issym():
            os.symlink(m.linkname, path)
            self._chown(path, m)
        _set_xattrs(path, m)
        os.utime(path, ns=(_mtime_ns(m), _mtime_ns(m)), follow_symlinks=False)

    def _dir_meta(self, path: Path, m: tarfile.TarInfo) -> None:
        self._chown(path, m)
        os.chmod(path, m.mode & 0o7777)
        _set_xattrs(path, m)
        self.dir_times.append((path, _mtime_ns(m)))

    def _hardlink(self, path: Path, m: tarfile.TarInfo) -> None:
        tparts = split_name(m.linkname)
        tdir = self.tree.resolve_dir(tparts[:-1], m.name, create=False)
        target = tdir / tparts[-1] if tdir is not None else None
        try:
            st = os.lstat(target) if target is not None else None
        except FileNotFoundError:
            st = None
        if target is None or st is None:
            raise ImageError(
                f"layer {self.tree.label}: hardlink {m.name!r} points to missing {m.linkname!r}"
            )
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeLayer(f"layer entry {m.name!r} is a hardlink to a directory")
        if target == path:
            return
        _remove(path)
        os.link(target, path, follow_symlinks=False)

    def finish(self) -> None:
        # Directory mtimes last (children changed them), deepest first.
        for path, ns in reversed(self.dir_times):
            os.utime(path, ns=(ns, ns), follow_symlinks=False)


def unpack_layer(
    source: LayerSource,
    root: Path,
    *,
    compression: str,
    name: str = "",
    diff_id: str | None = None,
) -> LayerScan:
    """Apply one layer (a tar, maybe compressed) onto directory ``root``.

    Ownership (when running as root), modes, mtimes and ``SCHILY.xattr.*``
    extended attributes (where the host file system takes them) are kept.

    Args:
        source: a path or a seekable binary file object.
        root: an existing directory holding the lower layers.
        compression: ``"none"``, ``"gzip"`` or ``"zstd"``.
        name: the layer's name for messages (its digest).
        diff_id: if given, the uncompressed digest must match it; checked
            before anything is written.

    Raises:
        UnsafeLayer: a hostile entry (nothing of it is written outside root;
            earlier entries of the layer may already be applied).
        ImageError: corrupt, truncated, or diff_id mismatch.
    """
    label = name or (str(source) if isinstance(source, Path) else "stream")
    ex = _Extractor(root, label)
    whiteouts: list[tuple[str, ...]] = []
    opaque: list[tuple[str, ...]] = []
    skipped: list[str] = []
    count = 0
    try:
        with _decompressed(source, compression) as reader:
            with tarfile.open(fileobj=reader, mode="r|") as tf:  # type: ignore[call-overload]
                for m in tf:
                    count += 1
                    _check_member(m)
                    parts = split_name(m.name)
                    if parts and parts[-1].startswith(WHITEOUT_PREFIX):
                        _check_whiteout(parts, m.name)
                        if parts[-1] == OPAQUE_WHITEOUT:
                            opaque.append(parts[:-1])
                        elif not parts[-1][len(WHITEOUT_PREFIX):].startswith(WHITEOUT_PREFIX):
                            whiteouts.append((*parts[:-1], parts[-1][len(WHITEOUT_PREFIX):]))
                        ex.whiteout(parts, m.name)
                    elif _is_special(m):
                        skipped.append(m.name)  # never created on the host
                    else:
                        ex.extract(m, tf, parts)
            reader.drain()
    except ImageError:
        raise
    except _READ_ERRORS as exc:
        raise _corrupt(label, exc) from exc
    got = "sha256:" + reader.hash.hexdigest()
    if diff_id is not None and got != diff_id:
        raise ImageError(
            f"layer {label} is corrupt: its content digest {got[:19]}… "
            f"does not match diff_id {diff_id[:19]}…"
        )
    ex.finish()
    return LayerScan(diff_id=got, size=reader.size, entries=count, whiteouts=tuple(whiteouts),
                     opaque_dirs=tuple(opaque), skipped=len(skipped),
                     skipped_names=tuple(skipped[:3]))


def _check_whiteout(parts: tuple[str, ...], name: str) -> None:
    base = parts[-1][len(WHITEOUT_PREFIX):]
    if parts[-1] != OPAQUE_WHITEOUT and base in ("", ".", ".."):
        raise UnsafeLayer(f"layer entry {name!r} is an invalid whiteout")
