"""Sample OCI images made from the host's busybox-static, for the demo, tests and benchmarks.

No registry and no Docker are needed: the image layout (``oci-layout``,
``index.json``, ``blobs/sha256/...``) is written directly, as the OCI image
spec describes it. The layers exercise what real images contain: symlinks,
a hardlink, ownership, a whiteout and an opaque directory.

Layers (``layers=3``):

1. busybox and its applet symlinks, ``/etc/passwd`` and ``/etc/group`` (users
   ``root``, ``app`` 1000:1000, ``nobody``), ``/etc/motd-old`` and
   ``/opt/old/{a,b}`` (both removed later), ``/home/app`` owned by app.
2. a whiteout of ``/etc/motd-old``, an opaque ``/opt/old`` holding only
   ``new``, the app script ``/app/hello.sh``, and ``/app/hello-link`` (a hardlink).
3. ``/app/data.txt`` (owned by app, mode 0640).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BUSYBOX = Path("/bin/busybox")

HELLO_SH = """#!/bin/sh
# The demo app: a tiny report from inside the microVM.
name="${1:-world}"
echo "$GREETING, $name! This is $(hostname), running Linux $(uname -r) on $(uname -m)."
echo "pid $$, user $(id -un) (uid $(id -u)), working directory $(pwd)"
echo "memory: $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo), cpus: $(nproc)"
echo "root filesystem: $(awk '$2 == "/" {print $3}' /proc/mounts) over the image's erofs"
echo "uptime: $(cut -d' ' -f1 /proc/uptime) s since the guest kernel started"
"""

PASSWD = """root:x:0:0:root:/root:/bin/sh
app:x:1000:1000:app:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = "root:x:0:\napp:x:1000:\nnogroup:x:65534:\n"


class _Layer:
    """A layer under construction: an in-memory tar."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def _add(self, info: tarfile.TarInfo, data: bytes | None = None) -> None:
        info.mtime = 1700000000
        if data is not None:
            info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data) if data is not None else None)

    def dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, mode, uid, gid
        self._add(info)

    def file(self, name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        info = tarfile.TarInfo(name)
        info.mode, info.uid, info.gid = mode, uid, gid
        self._add(info, data)

    def symlink(self, name: str, target: str) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
        self._add(info)

    def hardlink(self, name: str, target: str) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = tarfile.LNKTYPE, target
        self._add(info)

    def finish(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


def busybox_applets() -> list[str]:
    out = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True,
                         check=True).stdout
    return [a for a in out.split() if a and a != "bin/busybox"]


def busybox_layers(layers: int = 3) -> list[bytes]:
    """The uncompressed layer tars described in the module docstring (1 to 3 of them)."""
    base = _Layer()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root", "home", "opt",
              "opt/old", "app", "tmp", "var"):
        base.dir(d, 0o1777 if d == "tmp" else 0o755)
    base.dir("home/app", 0o755, 1000, 1000)
    base.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in busybox_applets():
        if applet.startswith(("bin/", "sbin/", "usr/bin/", "usr/sbin/")):
            depth = applet.count("/")
            base.symlink(applet, "../" * depth + "bin/busybox")
    base.file("etc/passwd", PASSWD.encode())
    base.file("etc/group", GROUP.encode())
    base.file("etc/motd-old", b"this file is whited out by layer 2\n")
    base.file("opt/old/a", b"a\n")
    base.file("opt/old/b", b"b\n")
    result = [base.finish()]
    if layers >= 2:
        l2 = _Layer()
        l2.file("etc/.wh.motd-old", b"")
        l2.dir("opt/old")
        l2.file("opt/old/.wh..wh..opq", b"")
        l2.file("opt/old/new", b"new\n")
        l2.dir("app")
        l2.file("app/hello.sh", HELLO_SH.encode(), 0o755)
        l2.hardlink("app/hello-link", "app/hello.sh")
        result.append(l2.finish())
    if layers >= 3:
        l3 = _Layer()
        l3.dir("app")
        l3.file("app/data.txt", b"layer three\n", 0o640, 1000, 1000)
        result.append(l3.finish())
    return result


def write_oci_layout(dest: Path, layers: Sequence[bytes], config: dict[str, Any],
                     *, tag: str = "ember/sample:latest", compress: bool = True) -> Path:
    """Write an OCI image layout at ``dest`` holding one image made of ``layers``."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}"

    descriptors = []
    diff_ids = []
    for raw in layers:
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        blob = gzip.compress(raw, mtime=0) if compress else raw
        descriptors.append({
            "mediaType": "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress else ""),
            "digest": put(blob), "size": len(blob),
        })
    config_doc = {
        "architecture": "amd64", "os": "linux", "created": "2026-01-01T00:00:00Z",
        "config": config, "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_blob = json.dumps(config_doc).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(config_blob), "size": len(config_blob)},
        "layers": descriptors,
    }).encode()
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": put(manifest), "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }]}
    (dest / "index.json").write_text(json.dumps(index))
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return dest


DEFAULT_CONFIG: dict[str, Any] = {
    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "GREETING=Hello"],
    "Cmd": ["/app/hello.sh"],
    "WorkingDir": "/app",
    "User": "app",
}


def write_busybox_image(dest: Path, *, layers: int = 3,
                        config: dict[str, Any] | None = None) -> Path:
    """The sample image as an OCI layout at ``dest`` (config defaults to ``DEFAULT_CONFIG``)."""
    return write_oci_layout(dest, busybox_layers(layers),
                            DEFAULT_CONFIG if config is None else config)


if __name__ == "__main__":
    import sys

    print(write_busybox_image(Path(sys.argv[1])))
