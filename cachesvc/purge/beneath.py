"""Linux ``openat2(2)``: a descent below a directory that follows no symlink, in one system call.

``RESOLVE_NO_SYMLINKS`` refuses a symlink in any component (``ELOOP``) and ``RESOLVE_BENEATH``
any escape from the starting directory (``EXDEV``): the guarantee of opening one component at a
time with ``O_NOFOLLOW``, which :mod:`cachesvc.purge.fstree` does, resolved atomically by the
kernel with one system call (and one release of the GIL) instead of one per component. Where the
kernel (before 5.6) or a seccomp filter does not have it, :func:`open_beneath` returns ``None``
and the caller walks component by component.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

SYS_OPENAT2 = 437
"""The same number on every Linux architecture (the unified system call table)."""

RESOLVE_NO_XDEV, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x01, 0x02, 0x04, 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _libc_syscall() -> Any:
    if os.uname().sysname != "Linux":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None


_syscall = _libc_syscall()
_missing = _syscall is None
_HOW_SIZE = ctypes.sizeof(_OpenHow)
_how: dict[int, _OpenHow] = {}  # one struct per set of flags: the kernel only reads it


def open_beneath(dir_fd: int, path: str, flags: int) -> int | None:
    """``openat2(dir_fd, path, flags)`` following no symlink and staying below *dir_fd*.

    Returns the descriptor, raises ``OSError`` as ``os.open`` would (``ELOOP`` for a symlink on the
    way, ``EXDEV`` for an escape), or returns ``None`` when this system has no ``openat2``.
    """
    global _missing
    if _missing:
        return None
    how = _how.get(flags)
    if how is None:
        how = _how[flags] = _OpenHow(flags, 0, RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
    fd = _syscall(SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how), _HOW_SIZE)
    if fd >= 0:
        return int(fd)
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM, errno.E2BIG):  # not there, refused by seccomp, an older struct
        _missing = True
        return None
    raise OSError(err, os.strerror(err), path)
