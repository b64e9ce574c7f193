"""``ember cp``: copy files and directories between the host and a machine, as tar."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import posixpath
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.cli.common import client, pipe_safe, write_all
from ember.errors import EmberError

if TYPE_CHECKING:
    import tarfile

    from ember.sdk import MachineHandle

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def parse_cp_arg(arg: str) -> tuple[str | None, str]:
    """``NAME:PATH`` -> (NAME, PATH); anything else is a host path (None, PATH).

    As with ``docker cp``, a host path containing ``:`` can be written ``./a:b``;
    a path starting with ``/``, ``.`` or ``~`` is always the host's.
    """
    if arg == "-" or arg.startswith(("/", ".", "~")):
        return None, arg
    name, sep, path = arg.partition(":")
    if sep and name and set(name) <= _NAME_CHARS:
        return name, path
    return None, arg


def cmd_cp(args: argparse.Namespace) -> int:
    src_name, src = parse_cp_arg(args.src)
    dst_name, dst = parse_cp_arg(args.dst)
    if src_name and dst_name:
        raise EmberError("copying between machines is not supported: copy to the host first")
    if not src_name and not dst_name:
        raise EmberError("one of SRC and DST must be a machine path, NAME:PATH")
    with client() as c:
        if src_name:
            if not src:
                raise EmberError(f"{args.src!r}: the machine path is empty")
            m = c.machines.get(src_name)
            copy_from_guest(m.get_archive(src), src, dst)
        else:
            assert dst_name is not None
            if not dst:
                raise EmberError(f"{args.dst!r}: the machine path is empty")
            copy_to_guest(c.machines.get(dst_name), src, dst)
    return 0


def copy_from_guest(tar_bytes: bytes, guest_path: str, dst: str) -> None:
    """Put the archive of ``guest_path`` at host path ``dst`` (``-``: the tar on stdout).

    Into ``dst`` when it is a directory, else as ``dst`` (the copy takes its
    name). The archive is checked by ``ember.files.extract_to_host``: absolute
    names, ``..``, device nodes and symlinked escapes are refused.
    """
    from ember.files import extract_to_host

    if dst == "-":
        write_all(1, tar_bytes)
        return
    dest = Path(os.path.expanduser(dst))
    whole_root = posixpath.normpath("/" + guest_path.lstrip("/")) == "/"
    if dest.is_dir() or whole_root:
        extract_to_host(tar_bytes, dest, allow_outside_symlinks=True)
        return
    if dst.endswith("/"):
        raise EmberError(f"destination directory {dst} does not exist")
    parent = dest.parent
    if not parent.is_dir():
        raise EmberError(f"{parent} is not a directory")
    import tempfile

    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=".ember-cp-"))
    try:
        extract_to_host(tar_bytes, tmp, allow_outside_symlinks=True)
        entries = os.listdir(tmp)
        if len(entries) != 1:
            raise EmberError(f"expected one entry in the archive of {guest_path}, "
                             f"got {len(entries)}")
        got = tmp / entries[0]
        if got.is_dir() and not got.is_symlink() and dest.exists():
            raise EmberError(f"cannot copy directory {guest_path} onto file {dst}")
        os.replace(got, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def host_tar(src: Path, arcname: str) -> bytes:
    """A tar of host file or directory ``src`` named ``arcname``, owned by root in the guest."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(src, arcname=arcname, recursive=True, filter=_owned_by_root)
    return buf.getvalue()


def _guest_is_dir(m: MachineHandle, path: str) -> bool:
    with contextlib.suppress(EmberError):
        return m.exec(["test", "-d", path], timeout=30).exit_code == 0
    return False


def copy_to_guest(m: MachineHandle, src: str, guest_path: str) -> None:
    """Copy host ``src`` (``-``: a tar on stdin) to ``guest_path`` in machine ``m``.

    Into ``guest_path`` when it ends with ``/`` or is a directory in the guest,
    else as ``guest_path`` (the copy takes its name; its directory is made).
    """
    gpath = guest_path if guest_path.startswith("/") else "/" + guest_path
    if src == "-":
        m.put_archive(gpath, sys.stdin.buffer.read())
        return
    path = Path(os.path.expanduser(src))
    if not os.path.lexists(path):
        raise EmberError(f"{src}: no such file or directory")
    base = Path(os.path.abspath(path)).name
    if not base:
        raise EmberError(f"cannot copy {src}: name a file or directory")
    if gpath.endswith("/") or _guest_is_dir(m, gpath):
        m.put_archive(gpath, host_tar(path, base))
    else:
        parent, name = posixpath.split(posixpath.normpath(gpath))
        m.put_archive(parent or "/", host_tar(path, name))


def register(sub: Any) -> None:
    p = sub.add_parser("cp", help="copy files between a machine and the host",
                       description="ember cp NAME:SRC HOSTDST | ember cp HOSTSRC NAME:DST. "
                       "- as the host side is a tar stream on stdin/stdout. A directory "
                       "destination receives SRC inside it; otherwise the copy takes DST's "
                       "name. End a machine path with / to mean a directory.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.set_defaults(func=pipe_safe(cmd_cp))
