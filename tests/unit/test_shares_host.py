"""The host side of shares and volumes without a VM: QEMU's devices, the mode filter
under a real bubblewrap, idmapped mounts on the real kernel."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ember.host import idmap, jail, modefilter
from ember.vmm.qemu import mount_args
from ember.vmm.spec import MachineSpec
from ember.volumes.shares import SHARES_ROOT, ShareMount
from ember.volumes.store import VolumeMount

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="no bubblewrap")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="idmapped mounts need root")


def spec(tmp_path: Path, **kw: object) -> MachineSpec:
    return MachineSpec(name="m", state_dir=tmp_path, kernel=tmp_path / "k",
                       initramfs=tmp_path / "i", cmdline="", **kw)  # type: ignore[arg-type]


def test_volumes_share_one_scsi_controller_and_shares_one_export(tmp_path: Path) -> None:
    assert mount_args(spec(tmp_path)) == []
    vols = tuple(VolumeMount(f"v{i}", tmp_path / f"v{i},x.img", f"/v{i}", i == 1)
                 for i in range(3))
    shares = tuple(ShareMount(tmp_path, f"/s{i}") for i in range(10))
    args = mount_args(spec(tmp_path, volumes=vols, shares=shares))
    devices = [args[i + 1] for i, a in enumerate(args) if a == "-device"]
    # two transports, however many mounts
    assert [d for d in devices if not d.startswith("scsi-hd")] == [
        "virtio-scsi-device,id=scsi0,num_queues=1",
        "virtio-9p-device,fsdev=shares,mount_tag=ember.shares"]
    assert [d.split(",")[-1] for d in devices if d.startswith("scsi-hd")] == [
        "lun=0", "lun=1", "lun=2"]
    drives = [args[i + 1] for i, a in enumerate(args) if a == "-drive"]
    assert "v0,,x.img" in drives[0] and "readonly=on" in drives[1]  # commas escaped
    assert f"path={SHARES_ROOT},security_model=none" in args[args.index("-fsdev") + 1]


def test_shares_are_bound_under_the_export_read_only_when_asked(tmp_path: Path) -> None:
    args = jail.bwrap_args(
        jail.Mounts(shares=((tmp_path / "a", f"{SHARES_ROOT}/0", False),
                            (tmp_path / "b", f"{SHARES_ROOT}/1", True))),
        bwrap="bwrap", share_net=False, userns=False, info_fd=3, die_with_parent=False,
        seccomp_fd=7)
    text = " ".join(args)
    assert f"--dir {SHARES_ROOT}" in text and "--seccomp 7" in text
    assert f"--bind {tmp_path / 'a'} {SHARES_ROOT}/0" in text
    assert f"--ro-bind {tmp_path / 'b'} {SHARES_ROOT}/1" in text


@needs_bwrap
@pytest.mark.skipif(not modefilter.supported(), reason="the filter is x86_64's")
def test_the_mode_filter_refuses_setuid_and_setgid_bits_only(tmp_path: Path) -> None:
    fd = modefilter.program_fd()
    try:
        script = (
            "import os, sys\n"
            "d = sys.argv[1]\n"
            "def tried(f):\n"
            "    try:\n"
            "        f(); return 'ok'\n"
            "    except PermissionError:\n"
            "        return 'EPERM'\n"
            "p = os.path.join(d, 'f')\n"
            "print(tried(lambda: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o755))))\n"
            "print(tried(lambda: os.chmod(p, 0o700)))\n"
            "print(tried(lambda: os.chmod(p, 0o4755)))\n"
            "print(tried(lambda: os.chmod(p, 0o2755)))\n"
            "print(tried(lambda: os.close(os.open(p + 'x', os.O_CREAT | os.O_WRONLY, 0o4755))))\n"
            "print(tried(lambda: os.mkdir(p + 'd', 0o2775)))\n"
            "print(tried(lambda: os.mkdir(p + 'e', 0o775)))\n"
            "print(oct(os.stat(p).st_mode & 0o7777))\n")
        proc = subprocess.run(
            ["bwrap", "--dev-bind", "/", "/", "--seccomp", str(fd), "--",
             "python3", "-c", script, str(tmp_path)],
            pass_fds=[fd], capture_output=True, text=True, timeout=30)
    finally:
        os.close(fd)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ok", "ok", "EPERM", "EPERM", "EPERM", "EPERM", "ok",
                                   "0o700"]


@needs_root
@needs_bwrap
def test_an_idmapped_share_makes_the_jail_uid_act_as_the_directory_owner(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idmap, "root", lambda: tmp_path / "mnts")
    d = tmp_path / "share"
    d.mkdir(mode=0o755)
    os.chown(d, 1234, 1234)
    (d / "theirs").write_text("x")
    os.chown(d / "theirs", 1234, 1234)
    (d / "roots").write_text("y")
    uid = 2000000000 + 4000
    paths = idmap.attach(99, [ShareMount(d, "/s")], uid, uid)
    try:
        assert paths == [tmp_path / "mnts" / "99" / "0"]
        st = os.stat(paths[0] / "theirs")
        assert (st.st_uid, st.st_gid) == (uid, uid)  # the owner, seen as the jail's uid
        assert os.stat(paths[0] / "roots").st_uid == 65534  # anyone else: unmapped
        proc = subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "sh", "-c",
             "echo new > new && echo z >> roots"],
            cwd=paths[0], capture_output=True, text=True, timeout=30)
        assert proc.returncode != 0 and "Permission denied" in proc.stderr
        # what the jail's uid created is the directory owner's on the host
        assert (os.stat(d / "new").st_uid, os.stat(d / "new").st_gid) == (1234, 1234)
        assert (d / "roots").read_text() == "y"
    finally:
        idmap.detach(paths)
    assert not (tmp_path / "mnts" / "99" / "0").exists()
    assert str(tmp_path / "mnts") not in Path("/proc/self/mountinfo").read_text()


@needs_root
def test_a_read_only_share_is_read_only_on_the_host_mount(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idmap, "root", lambda: tmp_path / "mnts")
    d = tmp_path / "ro"
    d.mkdir()
    paths = idmap.attach(98, [ShareMount(d, "/s", readonly=True)], 0, 0)
    try:
        with pytest.raises(OSError, match="Read-only"):
            (paths[0] / "x").write_text("no")
    finally:
        idmap.detach(paths)
    # a start that died half-way left a mount: the next start on the slot sweeps it
    paths = idmap.attach(98, [ShareMount(d, "/s")], 0, 0)
    idmap.sweep(98)
    assert not paths[0].exists()
