"""Build the guest agent (and the trivial power-off init) with the host's gcc.

The agent is the C files of ``agent_src/`` (with ``agent.h``, the header they
share); the power-off init and the TSC probe are one C file each next to this
module. Each is compiled by one gcc call into a static binary. The result is
cached under ``cache_dir/agent/<key>/`` where the key hashes the source (for the
agent every .c and .h file, by name and content), the compiler's identity (path,
size, mtime) and the flags: a second call costs a hash, not a compile. Binaries
are written under a temporary name and renamed, so a reader never sees half of
one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ember.errors import BuildError, HostError, SubprocessFailed
from ember.util import Progress, no_progress, run

#: gcc flags for guest binaries: static (the initramfs has no libc), small, stripped.
CFLAGS = ("-static", "-Os", "-s", "-Wall", "-Wextra")

_SOURCE_DIR = Path(__file__).resolve().parent

#: The agent's sources, a directory next to this module (not a Python package).
AGENT_SOURCES = "agent_src"


def _gcc() -> str:
    """The compiler: musl's gcc wrapper where installed, else gcc (static glibc).

    musl makes the agent a 80 kB binary instead of 720 kB of static glibc. Under
    TCG every page the guest touches is expensive: the musl agent reaches READY
    tens of milliseconds sooner, on every boot.
    """
    for name in ("musl-gcc", "gcc"):
        found = shutil.which(name)
        if found is not None:
            return found
    raise HostError("gcc is not installed: the guest agent is compiled on the host "
                    "(apt-get install gcc libc6-dev musl-tools)")


def _compiler_identity(gcc: str) -> str:
    """What identifies the compiler in the cache key: path, size and mtime of the
    compiler and (for the musl-gcc wrapper script) of the gcc it wraps.

    Stat, not ``gcc --version``: this runs on every ``ember run``, and a
    subprocess costs ~20 ms there; a package upgrade rewrites the files anyway.
    """
    parts = []
    for name in dict.fromkeys([gcc, shutil.which("gcc") or gcc]):
        real = os.path.realpath(name)
        try:
            st = os.stat(real)
        except OSError:
            parts.append(f"{real}:missing")
            continue
        parts.append(f"{real}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def _source(source_name: str, what: str) -> tuple[list[Path], bytes]:
    """The C files to compile, and what of them goes into the cache key.

    ``source_name`` is one C file (its content is the key material) or a directory:
    then every .c and .h file in it, each by name and content, so that a change to
    any of them (or one added, removed or renamed) rebuilds.
    """
    source = _SOURCE_DIR / source_name
    try:
        if not source.is_dir():
            return [source], source.read_bytes()
        files = sorted(p for p in source.iterdir() if p.suffix in (".c", ".h") and p.is_file())
        h = hashlib.sha256()
        for f in files:
            for part in (f.name.encode(), f.read_bytes()):
                h.update(len(part).to_bytes(8, "big"))
                h.update(part)
    except OSError as exc:
        raise BuildError(f"cannot read the {what} source {source}: {exc.strerror}") from exc
    c_files = [f for f in files if f.suffix == ".c"]
    if not c_files:
        raise BuildError(f"cannot read the {what} source {source}: no C files in it")
    return c_files, h.digest()


def _target(code: bytes, gcc: str, binary_name: str, cache_dir: Path) -> Path:
    """Where the binary built from ``code`` by ``gcc`` lives in the cache."""
    h = hashlib.sha256()
    for part in (code, _compiler_identity(gcc).encode(), " ".join(CFLAGS).encode()):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return cache_dir / "agent" / h.hexdigest()[:16] / binary_name


def agent_path(cache_dir: Path) -> Path:
    """Where ``build_agent`` puts (or has put) the agent; builds nothing."""
    _, code = _source(AGENT_SOURCES, "guest agent")
    return _target(code, _gcc(), "ember-agent", cache_dir)


def poweroff_path(cache_dir: Path) -> Path:
    """Where ``build_poweroff`` puts (or has put) the power-off init; builds nothing."""
    _, code = _source("poweroff.c", "power-off init")
    return _target(code, _gcc(), "ember-poweroff", cache_dir)


def _build(source_name: str, binary_name: str, what: str, cache_dir: Path,
           progress: Progress | None) -> Path:
    progress = progress or no_progress
    sources, code = _source(source_name, what)
    gcc = _gcc()
    target = _target(code, gcc, binary_name, cache_dir)
    out_dir = target.parent
    if target.is_file():
        return target
    progress(f"compiling the {what}")
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=f".{binary_name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            run([gcc, *CFLAGS, "-o", tmp, *sources], timeout=300)
        except SubprocessFailed as exc:
            raise BuildError(f"compiling the {what} failed: {exc}") from exc
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return target


def build_agent(cache_dir: Path, progress: Progress | None = None) -> Path:
    """The guest agent binary (``ember-agent``), compiled on first use and cached.

    Raises:
        HostError: gcc is not installed.
        BuildError: the compile failed (e.g. no static libc: install libc6-dev).
    """
    return _build(AGENT_SOURCES, "ember-agent", "guest agent", cache_dir, progress)


def build_poweroff(cache_dir: Path, progress: Progress | None = None) -> Path:
    """A trivial init that powers the VM off at once (for boot benchmarks); cached."""
    return _build("poweroff.c", "ember-poweroff", "power-off init", cache_dir, progress)


def build_tsc_probe(cache_dir: Path, progress: Progress | None = None) -> Path:
    """A host tool printing the host's TSC rate in kHz (see ``ember.host.tsc``); cached."""
    return _build("tsc-khz.c", "ember-tsc-khz", "TSC probe", cache_dir, progress)
