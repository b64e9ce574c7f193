"""A seccomp filter that keeps setuid and setgid bits out of what a jailed QEMU writes.

A guest writes to a host share through QEMU (``volumes/shares.py``), and may
ask for any mode bits on the files it makes. As root, what QEMU creates in a
share belongs to the share directory's owner, root included: a setuid bit
would then be a setuid-root program on the host. This filter, loaded by
bubblewrap under QEMU's own (``--seccomp``), makes every call that sets a
mode with ``S_ISUID`` or ``S_ISGID`` fail with ``EPERM``: ``chmod``,
``fchmod``, ``fchmodat``, ``fchmodat2``, and the creating ``open``, ``openat``,
``creat``, ``mkdir``, ``mkdirat``, ``mknod``, ``mknodat``. ``openat2``, whose mode
sits in a structure a filter cannot read, fails with ``ENOSYS`` (callers fall
back to ``openat``), and so does every x32 call.

x86_64 only: on another architecture no filter is loaded (the share keeps
QEMU's own filter and the idmapping; the gap is said in docs/architecture.md).
"""

from __future__ import annotations

import errno
import os
import platform
import struct

#: syscall number -> the index of its mode argument (x86_64).
_MODE_ARG = {
    90: 1,    # chmod(path, mode)
    91: 1,    # fchmod(fd, mode)
    268: 2,   # fchmodat(dirfd, path, mode)
    452: 2,   # fchmodat2(dirfd, path, mode, flags)
    2: 2,     # open(path, flags, mode)
    257: 3,   # openat(dirfd, path, flags, mode)
    85: 1,    # creat(path, mode)
    83: 1,    # mkdir(path, mode)
    258: 2,   # mkdirat(dirfd, path, mode)
    133: 1,   # mknod(path, mode, dev)
    259: 2,   # mknodat(dirfd, path, mode, dev)
}
_OPENAT2 = 437
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_BIT = 0x40000000
_SETID_BITS = 0o6000

# classic BPF
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000


def supported() -> bool:
    return platform.machine() == "x86_64"


def program() -> bytes:
    """The filter, as ``struct sock_filter`` entries (what ``bwrap --seccomp`` reads)."""
    deny = _RET_ERRNO | errno.EPERM
    nosys = _RET_ERRNO | errno.ENOSYS
    # Instructions with symbolic jump targets, resolved below.
    prog: list[tuple[int, object, object, int]] = [
        (_LD_W_ABS, 0, 0, 4),                          # arch
        (_JEQ_K, 0, "allow", _AUDIT_ARCH_X86_64),
        (_LD_W_ABS, 0, 0, 0),                          # nr
        (_JGE_K, "nosys", 0, _X32_BIT),
        (_JEQ_K, "nosys", 0, _OPENAT2),
    ]
    for nr, arg in _MODE_ARG.items():
        prog += [
            (_LD_W_ABS, 0, 0, 0),
            (_JEQ_K, 0, 2, nr),
            (_LD_W_ABS, 0, 0, 16 + 8 * arg),           # the low half of the argument
            (_JSET_K, "deny", "allow", _SETID_BITS),
        ]
    labels = {"allow": len(prog), "deny": len(prog) + 1, "nosys": len(prog) + 2}
    prog += [(_RET_K, 0, 0, _RET_ALLOW), (_RET_K, 0, 0, deny), (_RET_K, 0, 0, nosys)]
    out = bytearray()
    for i, (code, jt, jf, k) in enumerate(prog):
        out += struct.pack("<HBBI", code, _jump(jt, i, labels), _jump(jf, i, labels), k)
    return bytes(out)


def _jump(target: object, at: int, labels: dict[str, int]) -> int:
    if isinstance(target, str):
        return labels[target] - at - 1
    assert isinstance(target, int)
    return target


def program_fd() -> int:
    """A descriptor from which bubblewrap reads the filter (a memfd at offset 0)."""
    fd = os.memfd_create("ember-modefilter", os.MFD_CLOEXEC)
    os.write(fd, program())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
