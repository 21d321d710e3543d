"""posix_spawnp, called so that the calling thread lets go of the GIL and the child starts with the
signal dispositions a shell expects.

`os.posix_spawnp` holds the GIL until the child has called exec (the C library's vfork-like spawn
keeps the parent waiting until then), so every spawn stalls all the worker's other threads (its
gRPC handlers, its reporter, the other tasks' threads) for the length of an exec. Called through
ctypes, the same C function runs with the GIL released. The child also gets SIGPIPE and SIGXFSZ back
to their defaults (Python ignores them, and ignored signals stay ignored across exec, so `yes | head`
would see write errors instead of dying quietly) and an empty signal mask, as subprocess does with
restore_signals.

The flag values below are glibc's (2.26 and later) and musl's, which distrack supports (Linux). Where
the C library lacks one of the functions, os.posix_spawnp is used, with the same signal settings.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Mapping, Sequence

# The flags' values in glibc (2.26 and later) and musl.
_POSIX_SPAWN_SETSIGDEF = 0x04
_POSIX_SPAWN_SETSIGMASK = 0x08
_POSIX_SPAWN_SETSID = 0x80
# Larger than the C library's own structures (glibc: 80, 336 and 128 bytes), which stay opaque here.
_OPAQUE_BYTES = 1024
RESTORED_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


class _Opaque(ctypes.Structure):
    # 8-byte words: as aligned as the structures it stands for need.
    _fields_ = [("_words", ctypes.c_uint64 * (_OPAQUE_BYTES // 8))]


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for name in ("posix_spawnp", "posix_spawn_file_actions_init", "posix_spawn_file_actions_addopen",
                     "posix_spawn_file_actions_adddup2", "posix_spawn_file_actions_destroy", "posix_spawnattr_init",
                     "posix_spawnattr_setflags", "posix_spawnattr_setsigdefault", "posix_spawnattr_setsigmask",
                     "posix_spawnattr_destroy", "sigemptyset", "sigaddset"):
            getattr(libc, name)
    except (OSError, AttributeError):
        return None
    libc.posix_spawnattr_setflags.argtypes = [ctypes.c_void_p, ctypes.c_short]
    libc.posix_spawn_file_actions_addopen.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                                      ctypes.c_uint]
    return libc


_libc = _load_libc()


def spawn_session(file: str, argv: Sequence[str], env: Mapping[str, str], *, stdin_path: str,
                  output_fd: int) -> int:
    """Starts `argv` (found on PATH like execvp) in a new session, stdin from `stdin_path`, stdout and
    stderr to `output_fd`; returns its pid. Raises OSError when it cannot be started."""
    if _libc is None:
        return os.posix_spawnp(
            file, list(argv), dict(env),
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, stdin_path, os.O_RDONLY, 0),
                          (os.POSIX_SPAWN_DUP2, output_fd, 1), (os.POSIX_SPAWN_DUP2, output_fd, 2)],
            setsid=True, setsigdef=RESTORED_SIGNALS, setsigmask=(),
        )
    return _spawn_with_libc(_libc, file, argv, env, stdin_path, output_fd)


def _spawn_with_libc(libc: ctypes.CDLL, file: str, argv: Sequence[str], env: Mapping[str, str], stdin_path: str,
                     output_fd: int) -> int:
    args = [os.fsencode(a) for a in argv]
    environment = [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
    # A C string ends at its first NUL: refuse what would be cut short, as os.posix_spawnp does.
    if any(b"\0" in item for item in (*args, *environment)):
        raise ValueError("embedded null byte")
    c_argv = (ctypes.c_char_p * (len(args) + 1))(*args, None)
    c_env = (ctypes.c_char_p * (len(environment) + 1))(*environment, None)
    actions, attrs, defaults, mask = _Opaque(), _Opaque(), _Opaque(), _Opaque()
    _check(libc.posix_spawn_file_actions_init(ctypes.byref(actions)), "posix_spawn_file_actions_init")
    try:
        _check(libc.posix_spawnattr_init(ctypes.byref(attrs)), "posix_spawnattr_init")
        try:
            _check(libc.posix_spawn_file_actions_addopen(ctypes.byref(actions), 0, os.fsencode(stdin_path),
                                                         os.O_RDONLY, 0), "posix_spawn_file_actions_addopen")
            for target in (1, 2):
                _check(libc.posix_spawn_file_actions_adddup2(ctypes.byref(actions), output_fd, target),
                       "posix_spawn_file_actions_adddup2")
            libc.sigemptyset(ctypes.byref(defaults))
            for sig in RESTORED_SIGNALS:
                libc.sigaddset(ctypes.byref(defaults), int(sig))
            libc.sigemptyset(ctypes.byref(mask))
            _check(libc.posix_spawnattr_setsigdefault(ctypes.byref(attrs), ctypes.byref(defaults)),
                   "posix_spawnattr_setsigdefault")
            _check(libc.posix_spawnattr_setsigmask(ctypes.byref(attrs), ctypes.byref(mask)),
                   "posix_spawnattr_setsigmask")
            _check(libc.posix_spawnattr_setflags(ctypes.byref(attrs), _POSIX_SPAWN_SETSID | _POSIX_SPAWN_SETSIGDEF
                                                 | _POSIX_SPAWN_SETSIGMASK), "posix_spawnattr_setflags")
            pid = ctypes.c_int()
            # ctypes releases the GIL for the call: the other threads run while the child execs.
            err = libc.posix_spawnp(ctypes.byref(pid), os.fsencode(file), ctypes.byref(actions),
                                    ctypes.byref(attrs), c_argv, c_env)
            if err:
                raise OSError(err, os.strerror(err), file)
            return pid.value
        finally:
            libc.posix_spawnattr_destroy(ctypes.byref(attrs))
    finally:
        libc.posix_spawn_file_actions_destroy(ctypes.byref(actions))


def _check(err: int, what: str) -> None:
    if err:
        raise OSError(err, f"{what}: {os.strerror(err)}")
