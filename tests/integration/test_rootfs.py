"""A root that persists: a daemon machine's writable layer on disk.

A daemon machine keeps its file changes across stop, start and restart (the
layer is a sparse ext4 image next to its record) and loses them with ``rm``;
``tmpfs_root`` keeps today's memory layer; a snapshot of the machine carries
its layer, and a clone writes to a copy of its own; ``ember run --rootfs-size``
lets a guest write more than its RAM.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
from daemon_api import create, delete, get, run, start

from ember.images import ImageStore

ROOT = {"user": "root"}


def sh(api: httpx.Client, name: str, script: str) -> tuple[int, str]:
    r = run(api, name, "sh", "-c", script, **ROOT)
    return r["exit_code"], r["stdout"] + r["stderr"]


def test_a_daemon_machines_root_changes_survive_stop_and_start_and_go_with_rm(
        daemon: object) -> None:
    with daemon.http() as api:  # type: ignore[attr-defined]
        m = create(api, name="keeps", cmd=["sleep", "3600"], rootfs_size=256 << 20)
        assert m["rootfs_size"] == 256 << 20
        try:
            start(api, "keeps")
            assert sh(api, "keeps", "echo kept > /etc/note && rm /etc/group")[0] == 0
            assert api.post("/v1/machines/keeps/stop").status_code == 200
            start(api, "keeps")
            assert sh(api, "keeps", "cat /etc/note; test -e /etc/group; echo $?") == (
                0, "kept\n1\n")
            assert api.post("/v1/machines/keeps/restart").status_code == 200
            assert sh(api, "keeps", "cat /etc/note")[1] == "kept\n"
            # killed, not shut down: what was synced survives (ext4 replays its journal)
            assert sh(api, "keeps", "echo synced > /etc/synced && sync")[0] == 0
            r = api.post("/v1/machines/keeps/stop", params={"timeout": 0})
            assert r.status_code == 200
            start(api, "keeps")
            assert sh(api, "keeps", "cat /etc/synced /etc/note")[1] == "synced\nkept\n"
            # the layer's size is what the guest sees
            code, out = sh(api, "keeps", "df -k / | tail -1")
            assert code == 0 and 150_000 < int(out.split()[1]) < 262_144, out
        finally:
            delete(api, "keeps")
        create(api, name="keeps", cmd=["sleep", "3600"])
        try:
            start(api, "keeps")
            assert sh(api, "keeps", "test -e /etc/note; echo $?; test -e /etc/group; echo $?"
                      ) == (0, "1\n0\n")
            assert get(api, "keeps")["rootfs_size"] == 10 << 30  # the default
        finally:
            delete(api, "keeps")


def test_a_tmpfs_root_forgets_at_every_stop(daemon: object) -> None:
    with daemon.http() as api:  # type: ignore[attr-defined]
        m = create(api, name="forgets", cmd=["sleep", "3600"], tmpfs_root=True)
        assert m["rootfs_size"] is None
        try:
            start(api, "forgets")
            assert sh(api, "forgets", "echo x > /etc/note")[0] == 0
            assert api.post("/v1/machines/forgets/stop").status_code == 200
            start(api, "forgets")
            assert sh(api, "forgets", "test -e /etc/note; echo $?")[1] == "1\n"
        finally:
            delete(api, "forgets")
        r = api.post("/v1/machines", json={"image": "sample:latest", "tmpfs_root": True,
                                            "rootfs_size": 1 << 30})
        assert r.status_code == 422 and "exclude" in r.text


def test_a_snapshot_carries_the_layer_and_a_clone_writes_to_its_own(daemon: object) -> None:
    with daemon.http() as api:  # type: ignore[attr-defined]
        create(api, name="tmpl", cmd=["sleep", "3600"], rootfs_size=128 << 20)
        try:
            start(api, "tmpl")
            assert sh(api, "tmpl", "echo from-template > /srv-note")[0] == 0
            r = api.post("/v1/machines/tmpl/snapshots", json={"tag": "with-layer"})
            assert r.status_code == 201, r.text
            create(api, name="twin", snapshot="with-layer")
            start(api, "twin")
            assert sh(api, "twin", "cat /srv-note && echo twin > /srv-note")[0] == 0
            assert sh(api, "tmpl", "cat /srv-note")[1] == "from-template\n"
            # each start of a clone is afresh from its snapshot
            assert api.post("/v1/machines/twin/restart").status_code == 200
            assert sh(api, "twin", "cat /srv-note")[1] == "from-template\n"
        finally:
            delete(api, "twin")
            delete(api, "tmpl")
            api.delete("/v1/snapshots/with-layer")


def test_ember_run_with_a_disk_layer_writes_more_than_its_ram(store: ImageStore) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ember.cli", "run", "-q", "--rootfs-size", "1G", "-m", "256",
         "-u", "root", "sample", "--", "sh", "-c",
         "dd if=/dev/zero of=/big bs=1M count=400 2>/dev/null && ls -l /big | awk '{print $5}'"],
        capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.split() == [str(400 << 20).encode()]


def test_diff_lists_what_the_machine_added_changed_and_deleted(daemon: object) -> None:
    with daemon.http() as api:  # type: ignore[attr-defined]
        create(api, name="differ", cmd=["sleep", "3600"], tmpfs_root=True)
        try:
            start(api, "differ")
            assert api.get("/v1/machines/differ/changes").json() == []
            assert sh(api, "differ", "echo x > /new && echo y >> /etc/passwd && "
                      "rm /etc/group && mkdir -p /srv/a && touch /srv/a/f")[0] == 0
            got = [(c["kind"], c["path"]) for c in
                   api.get("/v1/machines/differ/changes").json()]
            assert got == [("C", "/etc"), ("D", "/etc/group"), ("C", "/etc/passwd"),
                           ("A", "/new"), ("A", "/srv"), ("A", "/srv/a"), ("A", "/srv/a/f")]
            assert api.post("/v1/machines/differ/stop").status_code == 200
            r = api.get("/v1/machines/differ/changes")
            assert r.status_code == 409 and "running" in r.text
        finally:
            delete(api, "differ")


def test_commit_makes_an_image_that_runs_with_the_changes(daemon: object) -> None:
    with daemon.http() as api:  # type: ignore[attr-defined]
        create(api, name="committer", cmd=["sleep", "3600"])
        try:
            start(api, "committer")
            assert sh(api, "committer", "echo made > /made && rm /etc/group && "
                      "rm -rf /app && mkdir /app && echo only > /app/only")[0] == 0
            r = api.post("/v1/machines/committer/commit",
                         json={"tag": "committed:1", "comment": "from a test"})
            assert r.status_code == 201, r.text
            image = r.json()
            assert "committed:1" in image["tags"]
            create(api, name="from-commit", image="committed:1", cmd=["sleep", "3600"])
            start(api, "from-commit")
            code, out = sh(api, "from-commit",
                           "cat /made; ls /app; test -e /etc/group; echo $?; hostname")
            assert (code, out) == (0, "made\nonly\n1\nfrom-commit\n")
        finally:
            delete(api, "from-commit")
            delete(api, "committer")
            api.delete("/v1/images/committed:1")
        r = api.post("/v1/machines/nobody-here/commit", json={})
        assert r.status_code == 404
