"""Idmapped mounts of host shares for a jailed QEMU (root only).

A jailed QEMU runs as uid 2000000000 + slot, which owns nothing on the host.
To serve a share, it gets an idmapped bind of the share's directory (Linux
5.12+: ``open_tree`` + ``mount_setattr(MOUNT_ATTR_IDMAP)``) on which the
directory's owner (uid and gid) appears as QEMU's uid and gid, and on which
what QEMU creates is stored as that owner's (``volumes/shares.py``). No other
host uid maps: QEMU can never create a file that belongs to anyone else.

The mount is attached at ``/run/ember/shares/SLOT/N`` only for as long as
bubblewrap needs to bind it into the jail: once QEMU runs, the jail has its
own copy and Ember detaches the host's (``detach``). What a crash leaves
behind is detached by the next start on the same slot (``sweep``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from ember.errors import VMMError
from ember.volumes.shares import ShareMount

#: The same numbers on every architecture (the unified syscall table).
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
_OPEN_TREE_CLONE, _OPEN_TREE_CLOEXEC = 1, os.O_CLOEXEC
_AT_FDCWD, _AT_EMPTY_PATH, _AT_SYMLINK_NOFOLLOW = -100, 0x1000, 0x100
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_MOUNT_ATTR_IDMAP = 0x100000
_MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def root() -> Path:
    return Path("/run/ember/shares")


def attach(slot: int, shares: Iterable[ShareMount], uid: int, gid: int) -> list[Path]:
    """Idmapped binds of ``shares`` for QEMU's ``uid``/``gid``: their host paths, in order.

    Raises:
        VMMError: the kernel or file system does not support idmapped mounts, or a
            share is gone.
    """
    shares = list(shares)
    base = root() / str(slot)
    sweep(slot)
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    owners = {}
    for m in shares:
        try:
            st = os.stat(m.source, follow_symlinks=False)
        except OSError as exc:
            raise VMMError(f"cannot share {m.source}: {exc.strerror}") from None
        owners[m] = (st.st_uid, st.st_gid)
    userns = {o: _userns(o[0], o[1], uid, gid) for o in set(owners.values())}
    out: list[Path] = []
    try:
        for i, m in enumerate(shares):
            target = base / str(i)
            target.mkdir(mode=0o700)
            _mount(m, userns[owners[m]], target)
            out.append(target)
    except BaseException:
        detach(out)
        raise
    finally:
        for fd in userns.values():
            os.close(fd)
    return out


def detach(paths: Iterable[Path]) -> None:
    """Detach the host's copies (the jail keeps its own) and remove their mount points."""
    for p in paths:
        _libc.umount2(str(p).encode(), _MNT_DETACH)
        with contextlib.suppress(OSError):
            p.rmdir()


def sweep(slot: int) -> None:
    """Detach what a start on ``slot`` that did not finish left attached."""
    base = root() / str(slot)
    if base.is_dir():
        detach(sorted(base.iterdir()))


def _userns(owner_uid: int, owner_gid: int, uid: int, gid: int) -> int:
    """A user namespace in which ``owner_uid``/``gid`` are ``uid``/``gid``: its descriptor.

    Mount idmappings read a namespace's maps the other way round: a file
    stored as owner_uid is seen as uid, and what uid creates is stored as
    owner_uid.
    """
    unshare = shutil.which("unshare") or "unshare"
    proc = subprocess.Popen([unshare, "--user", "--", "sleep", "30"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        mine = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 5
        while True:
            try:
                if os.readlink(f"/proc/{proc.pid}/ns/user") != mine:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                raise VMMError(f"cannot make a user namespace for a share: {err or 'timed out'}")
            time.sleep(0.001)
        Path(f"/proc/{proc.pid}/uid_map").write_text(f"{owner_uid} {uid} 1\n")
        Path(f"/proc/{proc.pid}/setgroups").write_text("deny")
        Path(f"/proc/{proc.pid}/gid_map").write_text(f"{owner_gid} {gid} 1\n")
        return os.open(f"/proc/{proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise VMMError(f"cannot make a user namespace for a share: {exc.strerror}") from None
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _mount(m: ShareMount, userns_fd: int, target: Path) -> None:
    fd = _libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, str(m.source).encode(),
                       _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_SYMLINK_NOFOLLOW)
    if fd < 0:
        raise VMMError(f"cannot share {m.source}: {os.strerror(ctypes.get_errno())}")
    try:
        flags = (_MOUNT_ATTR_IDMAP | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV
                 | (_MOUNT_ATTR_RDONLY if m.readonly else 0))
        attr = ctypes.create_string_buffer(struct.pack("QQQQ", flags, 0, 0, userns_fd))
        if _libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, attr, 32) != 0:
            err = ctypes.get_errno()
            raise VMMError(f"cannot share {m.source}: its file system does not support "
                           f"idmapped mounts ({os.strerror(err)})")
        if _libc.syscall(_SYS_MOVE_MOUNT, fd, b"", _AT_FDCWD, str(target).encode(),
                         _MOVE_MOUNT_F_EMPTY_PATH) != 0:
            raise VMMError(f"cannot share {m.source}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)
