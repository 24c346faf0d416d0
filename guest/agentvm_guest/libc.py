"""The C library calls the guest agent needs that Python's standard library lacks.

One place for their prototypes (set once, at import: nothing is looked up in
a forked child, where :mod:`.confine` and :mod:`.pivot` call them before
exec) and for the flag values from the kernel's headers. Each returns the C
result; the caller reads ``ctypes.get_errno()`` on failure.
"""

from __future__ import annotations

import ctypes

# <sys/mount.h>
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 2

# The process's own symbols include libc's (no ``find_library``: that runs ldconfig).
LIBC = ctypes.CDLL(None, use_errno=True)
_ulong = ctypes.c_ulong

mount = LIBC.mount
mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, _ulong, ctypes.c_char_p]
mount.restype = ctypes.c_int

umount2 = LIBC.umount2
umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
umount2.restype = ctypes.c_int

prctl = LIBC.prctl
prctl.argtypes = [ctypes.c_int, _ulong, _ulong, _ulong, _ulong]
prctl.restype = ctypes.c_int

unshare = LIBC.unshare
unshare.argtypes = [ctypes.c_int]
unshare.restype = ctypes.c_int

# syscall(2) is variadic: callers pass ctypes-typed arguments.
syscall = LIBC.syscall
