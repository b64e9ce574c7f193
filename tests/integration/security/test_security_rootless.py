"""Without root, Ember still runs machines, confined as far as the host lets it.

``ember run`` as ``nobody`` (the system Python with the project's packages, a
data dir and cache of its own): it works cold and warm, says it gives less
confinement, and its QEMU runs in a user namespace with its own mount and PID
namespaces, no capabilities, no_new_privs and seccomp on every thread.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember import paths

SYSTEM_PYTHON = "/usr/bin/python3"
ROOT = Path(__file__).resolve().parents[3]


def _why_not() -> str:
    if os.geteuid() != 0:
        return "switching to nobody needs root"
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return "no user nobody"
    if shutil.which("bwrap") is None:
        return "no bubblewrap"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"no {SYSTEM_PYTHON}"
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    if version != str(tuple(sys.version_info[:2])):
        return f"{SYSTEM_PYTHON} is not Python {sys.version_info[:2]} (the venv's packages)"
    return ""


pytestmark = [pytest.mark.security, pytest.mark.skipif(bool(_why_not()), reason=_why_not())]


@pytest.fixture(scope="module")
def nobody_env(guest: object) -> Iterator[dict[str, str]]:
    """A data dir and a cache of nobody's own (the guest bundle copied in)."""
    nobody = pwd.getpwnam("nobody")
    work = Path(tempfile.mkdtemp(prefix="ember-rootless-", dir="/tmp"))
    try:
        cache = work / "cache"
        cache.mkdir()
        for part in ("kernel", "initramfs", "agent"):
            if (paths.cache_dir() / part).exists():
                shutil.copytree(paths.cache_dir() / part, cache / part, symlinks=True)
        for p in [work, *work.rglob("*")]:
            os.chown(p, nobody.pw_uid, nobody.pw_gid, follow_symlinks=False)
        site = next((ROOT / ".venv" / "lib").glob("python3*/site-packages"))
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(work),
               "EMBER_HOME": str(work / "home"), "EMBER_CACHE": str(cache),
               "PYTHONPATH": f"{ROOT / 'src'}:{site}", "PYTHONDONTWRITEBYTECODE": "1"}
        yield env
    finally:
        # `ember image` went through a daemon it started (as nobody): it goes too
        for what in ("ember serve", "qemu-system"):
            subprocess.run(["pkill", "-KILL", "-u", "nobody", "-f", what], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def as_nobody(env: dict[str, str], *args: str, **kw: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--init-groups",
                             SYSTEM_PYTHON, "-m", "ember", *args], env=env, cwd=env["HOME"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # type: ignore


def ember(env: dict[str, str], *args: str, timeout: float = 180) -> tuple[int, str, str]:
    p = as_nobody(env, *args)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out.decode(), err.decode()


@pytest.mark.timeout(300)
def test_ember_run_works_without_root_cold_and_warm(nobody_env: dict[str, str]) -> None:
    rc, _, err = ember(nobody_env, "image", "sample", "--tag", "app:1")
    assert rc == 0, err
    for _ in range(2):  # a boot, then a warm start from the boot snapshot it left
        rc, out, err = ember(nobody_env, "run", "--rm", "app:1", "--", "echo", "rootless")
        assert rc == 0, err
        assert out == "rootless\n"
        assert "less confinement" in err
    assert "warm start" in err
    rc, out, _ = ember(nobody_env, "doctor")
    assert "jail         rootless:" in out


@pytest.mark.timeout(300)
def test_a_rootless_qemu_is_in_a_user_namespace_with_seccomp(nobody_env: dict[str, str]) -> None:
    ember(nobody_env, "image", "sample", "--tag", "app:1")
    proc = as_nobody(nobody_env, "run", "--rm", "app:1", "--", "sh", "-c",
                     "echo started; sleep 600")
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
        deadline = time.monotonic() + 30
        pids: list[str] = []
        while not pids and time.monotonic() < deadline:
            pids = subprocess.run(["pgrep", "-u", "nobody", "-x", "qemu-system-x86"],
                                  capture_output=True, text=True).stdout.split()
        (pid,) = pids
        status = dict(line.split(":", 1) for line in
                      Path(f"/proc/{pid}/status").read_text().splitlines())
        assert status["Uid"].split()[0] == str(pwd.getpwnam("nobody").pw_uid)
        assert int(status["CapEff"], 16) == 0 and status["NoNewPrivs"].strip() == "1"
        for t in os.listdir(f"/proc/{pid}/task"):
            assert "Seccomp:\t2" in Path(f"/proc/{pid}/task/{t}/status").read_text()
        for ns in ("user", "mnt", "pid", "ipc", "uts"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.timeout(300)
def test_a_rootless_share_is_live_and_what_the_guest_writes_is_the_users(
        nobody_env: dict[str, str]) -> None:
    ember(nobody_env, "image", "sample", "--tag", "app:1")
    nobody = pwd.getpwnam("nobody")
    share = Path(nobody_env["HOME"]) / "project"
    share.mkdir()
    (share / "in").write_text("from the host\n")
    os.chown(share, nobody.pw_uid, nobody.pw_gid)
    rc, out, err = ember(nobody_env, "run", "--rm", "-u", "root", "-v", "./project:/work",
                         "app:1", "--", "sh", "-c", "cat /work/in && echo out > /work/out")
    assert rc == 0, err
    assert out == "from the host\n"
    st = (share / "out").stat()
    assert (st.st_uid, (share / "out").read_text()) == (nobody.pw_uid, "out\n")
