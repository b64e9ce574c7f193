"""Host shares on real guests: a host directory shared live over 9p.

What either side writes the other reads at once; ``:ro`` holds even against
the guest's root (the host's mount is read-only); a symlink in a share never
reaches the host's files; what the guest creates belongs to the share's owner
and never carries a setuid bit; and one machine takes ten shares and five
volumes (they use two of microvm's eight transports).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import vms
from vms import halt

from ember import paths
from ember.agent.protocol import ExecRequest
from ember.errors import EmberError
from ember.guest.bundle import GuestBundle
from ember.images import ImageStore
from ember.machine import Machine, MachineConfig
from ember.volumes.shares import ShareMount, share
from ember.volumes.store import VolumeRequest, VolumeStore

PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"


def sh(m: Machine, script: str, user: str = "root") -> tuple[int | None, str]:
    p = m.exec(ExecRequest(argv=["/bin/sh", "-c", script], env=[PATH], user=user))
    st = m.wait_process(p, timeout=60)
    return st.exit_code, (p.stdout + p.stderr).decode()


def boot(store: ImageStore, guest: GuestBundle, *shares: ShareMount,
         volumes: tuple[VolumeRequest, ...] = ()) -> Machine:
    vs = VolumeStore(paths.volumes_dir())
    return vms.boot(store, guest, MachineConfig(shares=shares,
                                                volumes=tuple(vs.mount(v) for v in volumes)))


@pytest.fixture
def hostdir(tmp_path: Path) -> Path:
    d = tmp_path / "shared"
    d.mkdir()
    (d / "from-host").write_text("written on the host\n")
    return d


def test_writes_through_a_share_are_seen_both_ways(
        store: ImageStore, guest: GuestBundle, hostdir: Path) -> None:
    m = boot(store, guest, share(str(hostdir), "/src"))
    try:
        assert sh(m, "cat /src/from-host") == (0, "written on the host\n")
        assert sh(m, "mkdir -p /src/sub && echo from guest > /src/sub/g && "
                     "chmod 750 /src/sub/g")[0] == 0
        assert (hostdir / "sub" / "g").read_text() == "from guest\n"
        st = os.stat(hostdir / "sub" / "g")
        # the share directory's owner's, with the mode the guest asked for
        assert (st.st_uid, st.st_gid) == (hostdir.stat().st_uid, hostdir.stat().st_gid)
        assert st.st_mode & 0o7777 == 0o750
        # a file the host writes while the guest runs is there at once
        (hostdir / "later").write_text("after boot\n")
        assert sh(m, "cat /src/later") == (0, "after boot\n")
        (hostdir / "later").unlink()
        assert sh(m, "test -e /src/later")[0] != 0
        # the owner's files show as QEMU's uid: the guest's root acts as the owner,
        # other guest users get what the mode bits give everyone
        assert sh(m, "cat /src/from-host", user="nobody")[0] == 0
        assert sh(m, "echo x > /src/by-nobody", user="nobody")[0] != 0
        # never a setuid or setgid bit on the host, whoever asks
        code, out = sh(m, "touch /src/prog && chmod 4755 /src/prog; chmod 2755 /src/prog")
        assert code != 0 and "Operation not permitted" in out
        assert os.stat(hostdir / "prog").st_mode & 0o6000 == 0
        # the guest sees its share and nothing else of QEMU's export
        code, out = sh(m, "grep 9p /proc/mounts")
        assert code == 0 and [ln.split()[1] for ln in out.splitlines()] == ["/src"]
        # no snapshot of a machine whose guest holds a share's state
        from ember.snapshots.start import user_store
        from ember.snapshots.take import begin

        with pytest.raises(EmberError, match="host shares"):
            begin(m, user_store())
    finally:
        halt(m)
    # the host's idmapped mounts were only there for the jail to bind
    mounts = Path("/proc/self/mountinfo").read_text()
    assert "/run/ember/shares/" not in mounts


def test_a_read_only_share_refuses_writes_even_from_the_guests_root(
        store: ImageStore, guest: GuestBundle, hostdir: Path) -> None:
    m = boot(store, guest, share(str(hostdir), "/cfg", readonly=True))
    try:
        assert sh(m, "cat /cfg/from-host") == (0, "written on the host\n")
        code, out = sh(m, "echo x > /cfg/new")
        assert code != 0 and "Read-only file system" in out
        # the guest's root can make its own bind writable: the host's still is not
        code, out = sh(m, "mount -o remount,rw /cfg && echo x > /cfg/new")
        assert code != 0
        assert sorted(os.listdir(hostdir)) == ["from-host"]
    finally:
        halt(m)


def test_a_symlink_in_a_share_does_not_reach_outside_it(
        store: ImageStore, guest: GuestBundle, hostdir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret\n")
    (hostdir / "abs").symlink_to(outside / "secret")
    (hostdir / "rel").symlink_to("../outside/secret")
    (hostdir / "dir").symlink_to(outside)
    m = boot(store, guest, share(str(hostdir), "/src"))
    try:
        # each link reaches the guest as a link, resolved in the guest's own files
        code, out = sh(m, "readlink /src/abs; readlink /src/rel")
        assert out.split() == [str(outside / "secret"), "../outside/secret"]
        for link in ("abs", "rel", "dir/secret"):
            code, out = sh(m, f"cat /src/{link}")
            assert code != 0 and "host secret" not in out, link
        # nor does climbing out of the share's top
        code, out = sh(m, "ls -a /src/../ ; cat /src/../outside/secret /src/../../outside/secret")
        assert "host secret" not in out
        # a link the guest makes is a link on the host too, not a way out
        assert sh(m, f"ln -s {outside}/secret /src/made && cat /src/made")[0] != 0
        assert os.readlink(hostdir / "made") == f"{outside}/secret"
    finally:
        halt(m)


def test_a_share_that_is_gone_fails_the_start_in_one_line(
        store: ImageStore, guest: GuestBundle, tmp_path: Path) -> None:
    d = tmp_path / "vanishing"
    d.mkdir()
    s = share(str(d), "/x")
    d.rmdir()
    with pytest.raises(EmberError, match="not a directory any more"):
        boot(store, guest, s)


def test_ten_shares_and_five_volumes_on_one_machine(
        store: ImageStore, guest: GuestBundle, tmp_path: Path) -> None:
    vs = VolumeStore(paths.volumes_dir())
    dirs = []
    for i in range(10):
        d = tmp_path / f"s{i}"
        d.mkdir()
        (d / "name").write_text(f"share {i}\n")
        dirs.append(d)
    names = [f"many{i}" for i in range(5)]
    for n in names:
        vs.create(n, 16 << 20)
    try:
        m = boot(store, guest, *(share(str(d), f"/shares/s{i}") for i, d in enumerate(dirs)),
                 volumes=tuple(VolumeRequest(n, f"/vols/{n}") for n in names))
        try:
            script = " && ".join(
                [f"cat /shares/s{i}/name && echo {i} > /shares/s{i}/back" for i in range(10)]
                + [f"echo {n} > /vols/{n}/f && cat /vols/{n}/f" for n in names])
            code, out = sh(m, script)
            assert code == 0, out
            assert out.split("\n")[:10] == [f"share {i}" for i in range(10)]
            assert out.split("\n")[10:15] == names
            assert [(d / "back").read_text() for d in dirs] == [f"{i}\n" for i in range(10)]
            # all of them on two devices: one SCSI controller and one 9p export
            code, out = sh(m, "ls /sys/bus/virtio/devices | wc -l; ls /sys/block | grep -c sd")
            assert out.split() == ["5", "5"]
        finally:
            halt(m)
    finally:
        for n in names:
            vs.remove(n)


def test_through_the_daemon_a_share_is_live_and_listed(daemon: object, tmp_path: Path) -> None:
    from daemon_api import create, delete, run, start

    d = tmp_path / "api-share"
    d.mkdir()
    (d / "in").write_text("from host\n")
    with daemon.http() as api:  # type: ignore[attr-defined]
        create(api, name="share-a", cmd=["sleep", "3600"],
               shares=[{"source": str(d), "target": "/work"}])
        try:
            start(api, "share-a")
            assert run(api, "share-a", "cat", "/work/in")["stdout"] == "from host\n"
            assert run(api, "share-a", "sh", "-c", "echo out > /work/out",
                       user="root")["exit_code"] == 0
            assert (d / "out").read_text() == "out\n"
            info = api.get("/v1/machines/share-a").json()
            assert info["shares"] == [{"source": str(d), "target": "/work", "readonly": False}]
        finally:
            delete(api, "share-a")


def test_a_boot_snapshot_serves_machines_with_their_own_volumes_and_shares(
        store: ImageStore, tmp_path: Path) -> None:
    """Boot snapshots are taken before the root is mounted: a machine started warm from
    one mounts its own volume (of another size) and its own share."""
    import subprocess
    import sys

    vs = VolumeStore(paths.volumes_dir())
    vs.create("warm-a", 32 << 20)
    vs.create("warm-b", 96 << 20)
    outs = []
    try:
        for vol in ("warm-a", "warm-b"):
            d = tmp_path / vol
            d.mkdir()
            (d / "who").write_text(f"share of {vol}\n")
            proc = subprocess.run(
                [sys.executable, "-m", "ember.cli", "run", "--rm", "-u", "root", "-v",
                 f"{vol}:/data", "-v", f"{d}:/s:ro", "sample", "--", "sh", "-c",
                 "cat /s/who; echo kept >> /data/f; cat /data/f; "
                 "df -k /data | tail -1 | awk '{print $2}'"],
                capture_output=True, timeout=180, stdin=subprocess.DEVNULL)
            assert proc.returncode == 0, proc.stderr.decode()
            outs.append((proc.stdout.decode().split("\n"), proc.stderr.decode()))
    finally:
        vs.remove("warm-a")
        vs.remove("warm-b")
    (a, _), (b, b_err) = outs
    assert "warm start" in b_err
    assert a[:2] == ["share of warm-a", "kept"] and b[:2] == ["share of warm-b", "kept"]
    assert int(b[2]) > 2 * int(a[2])  # its own disk's size, not the snapshot's
