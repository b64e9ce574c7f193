"""The guest kernel: Debian's linux-source-6.1 built into a minimal microVM kernel.

Recipe: ``make tinyconfig``, merge the project's fragment (``kernel.config``
beside this file) with ``scripts/kconfig/merge_config.sh -m``, ``make
olddefconfig``, then check that every option the fragment asks for survived
(kconfig silently drops an option whose dependencies are off: tinyconfig has
``CONFIG_BLOCK`` off, so ``CONFIG_VIRTIO_BLK=y`` alone quietly vanishes), and
``make vmlinux``. QEMU's microvm boots the uncompressed ELF ``vmlinux``
directly through its PVH entry point, which skips the bzImage decompressor.

The result is cached under ``<cache>/kernel/<key>/`` where the key hashes the
source tarball's identity (name, size, mtime: it changes with every package
upgrade), the fragment's text and the patches in ``kernel-patches/``, so
changing any of them rebuilds, and nothing else does.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ember.errors import BuildError, HostError
from ember.util import Progress, log, no_progress, run

SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
FRAGMENT = Path(__file__).with_name("kernel.config")
#: Small patches applied to the source before configuring, in name order.
PATCHES_DIR = Path(__file__).with_name("kernel-patches")
BUILD_TOOLS = ("make", "gcc", "flex", "bison", "bc", "tar", "xz", "patch")
#: Objects compiled by a build of the fragment on 6.1 (for a progress estimate only).
EXPECTED_OBJECTS = 1000


@dataclass(frozen=True)
class KernelArtifact:
    """A built guest kernel in the cache."""

    key: str
    dir: Path

    @property
    def vmlinux(self) -> Path:
        return self.dir / "vmlinux"

    @property
    def config(self) -> Path:
        return self.dir / "config"

    def exists(self) -> bool:
        return self.vmlinux.is_file() and self.config.is_file()

    def hz(self) -> int:
        """The kernel's timer frequency (CONFIG_HZ), or 0 if the config does not say."""
        for line in self.config.read_text().splitlines():
            if line.startswith("CONFIG_HZ="):
                return int(line.partition("=")[2])
        return 0


def requested_options(fragment_text: str) -> list[str]:
    """The ``CONFIG_X=value`` lines of a fragment (comments and blanks skipped)."""
    return [
        line.strip()
        for line in fragment_text.splitlines()
        if line.strip().startswith("CONFIG_")
    ]


def missing_options(fragment_text: str, final_config: str) -> list[str]:
    """Options the fragment asked for that are not in the final ``.config``.

    ``CONFIG_X=n`` in a fragment is satisfied by ``# CONFIG_X is not set`` or by
    its absence, which is how kconfig writes a disabled option.
    """
    present = set(final_config.splitlines())
    missing = []
    for opt in requested_options(fragment_text):
        name, _, value = opt.partition("=")
        if value == "n":
            if f"{name}=y" in present or f"{name}=m" in present:
                missing.append(opt)
        elif opt not in present:
            missing.append(opt)
    return missing


def kernel_key(tarball: Path = SOURCE_TARBALL, fragment: Path = FRAGMENT) -> str:
    """The cache key: source identity + fragment text. Cheap (one stat, one small read)."""
    h = hashlib.sha256()
    try:
        st = tarball.stat()
        h.update(f"{tarball.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    except FileNotFoundError:
        h.update(f"{tarball.name}:missing\n".encode())
    h.update(fragment.read_bytes())
    for patch in kernel_patches():
        h.update(patch.name.encode() + b"\0" + patch.read_bytes())
    return h.hexdigest()[:16]


def kernel_patches() -> list[Path]:
    return sorted(PATCHES_DIR.glob("*.patch"))


def kernel_artifact(cache_dir: Path) -> KernelArtifact:
    key = kernel_key()
    return KernelArtifact(key=key, dir=cache_dir / "kernel" / key)


def ensure_kernel(cache_dir: Path, progress: Progress = no_progress) -> KernelArtifact:
    """Return the cached kernel, building it first if needed (about 3 minutes on 2 cores).

    Concurrent callers serialise on a lock file; the second one finds the cache filled.

    Raises:
        HostError: the kernel source or a build tool is missing.
        BuildError: the build failed or dropped a requested option.
    """
    art = kernel_artifact(cache_dir)
    if art.exists():
        return art
    art.dir.parent.mkdir(parents=True, exist_ok=True)
    with open(art.dir.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if art.exists():
            return art
        _build(art, progress)
    return art


def _build(art: KernelArtifact, progress: Progress) -> None:
    if not SOURCE_TARBALL.is_file():
        raise HostError(
            f"kernel source {SOURCE_TARBALL} is missing: run `ember setup` "
            "(it installs Debian's linux-source-6.1)"
        )
    for tool in BUILD_TOOLS:
        if shutil.which(tool) is None:
            raise HostError(f"{tool} is needed to build the guest kernel: run `ember setup`")
    fragment_text = FRAGMENT.read_text()
    jobs = str(os.cpu_count() or 2)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=art.dir.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        progress(f"building the guest kernel {art.key} (once, about 3 minutes): unpacking source")
        run(["tar", "-xf", SOURCE_TARBALL, "-C", work, "--strip-components=1"])
        log_path = work / "build.log"
        try:
            for patch in kernel_patches():
                progress(f"applying {patch.name}")
                run(["patch", "-p1", "--forward", "--batch", "-i", patch], cwd=work)
            progress("configuring the guest kernel (tinyconfig + ember fragment)")
            run(["make", "tinyconfig"], cwd=work, stdout_path=log_path)
            run(["scripts/kconfig/merge_config.sh", "-m", ".config", FRAGMENT],
                cwd=work, stdout_path=log_path)
            run(["make", "olddefconfig"], cwd=work, stdout_path=log_path)
            final = (work / ".config").read_text()
            missing = missing_options(fragment_text, final)
            if missing:
                raise BuildError(
                    "kernel config dropped requested options (missing dependencies?): "
                    + ", ".join(missing)
                )
            _make_with_progress(["make", f"-j{jobs}", "vmlinux"], work, log_path, progress)
        except BuildError:
            raise
        except Exception as exc:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            log.error("kernel build failed; log tail:\n%s", tail)
            raise BuildError(f"guest kernel build failed: {exc}") from exc
        staging = work / "out"
        staging.mkdir()
        shutil.copy2(work / "vmlinux", staging / "vmlinux")
        shutil.copy2(work / ".config", staging / "config")
        (staging / "build.log").write_text(log_path.read_text(errors="replace")[-20000:])
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(art.dir)
        os.rename(staging, art.dir)
    progress(f"guest kernel built in {time.monotonic() - started:.0f} s: {art.vmlinux}")


def _make_with_progress(cmd: list[str], cwd: Path, log_path: Path, progress: Progress) -> None:
    """Run make, counting compiled objects, and report every 15 seconds."""
    count = 0
    done = threading.Event()
    started = time.monotonic()

    def ticker() -> None:
        while not done.wait(15):
            pct = min(99, 100 * count // EXPECTED_OBJECTS)
            progress(f"compiling the guest kernel: ~{pct}% ({count} objects, "
                     f"{time.monotonic() - started:.0f} s)")

    t = threading.Thread(target=ticker, daemon=True)
    t.start()
    try:
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            assert proc.stdout is not None
            for line in proc.stdout:
                logf.write(line)
                if line.lstrip().startswith((b"CC ", b"AS ")):
                    count += 1
            rc = proc.wait()
    finally:
        done.set()
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-1500:]
        raise BuildError(f"make vmlinux failed (status {rc}): {tail.strip().splitlines()[-1:]}")
