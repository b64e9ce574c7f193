"""``ember commit``'s layer from a guest's tar (``images/commit.py``), without a VM: the
overlay's whiteouts become OCI ones, hostile entries are refused."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from ember.images.commit import CommitError, _convert


def guest_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **kw: object
          ) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    for k, v in kw.items():
        setattr(info, k, v)
    return info, data if kind == tarfile.REGTYPE else None


def converted(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]],
              hidden: list[str] = ()) -> dict[str, tarfile.TarInfo]:  # type: ignore[assignment]
    src = guest_tar(tmp_path / "upper.tar", members)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as dst:
        _convert(src, dst, hidden, {"etc/hostname", "etc/hosts", "etc/resolv.conf"})
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:
        return {m.name: m for m in tf}


def test_whiteouts_hidden_entries_and_the_agents_files(tmp_path: Path) -> None:
    out = converted(tmp_path, [
        entry(".", tarfile.DIRTYPE), entry("./etc", tarfile.DIRTYPE),
        entry("./etc/group", tarfile.CHRTYPE, devmajor=0, devminor=0),
        entry("./etc/hostname", data=b"m1\n"), entry("./etc/passwd", data=b"root:x:0:0\n"),
        entry("./app", tarfile.DIRTYPE), entry("./app/only", data=b"x"),
        entry("./dev-null", tarfile.CHRTYPE, devmajor=1, devminor=3),
        entry("./lnk", tarfile.SYMTYPE, linkname="/etc/passwd"),
        entry("./hard", tarfile.LNKTYPE, linkname="./etc/passwd"),
    ], hidden=["/app/hello.sh", "/app/data.txt"])
    assert sorted(out) == ["app", "app/.wh.data.txt", "app/.wh.hello.sh", "app/only", "dev-null",
                           "etc", "etc/.wh.group", "etc/passwd", "hard", "lnk"]
    assert out["etc/.wh.group"].isreg() and out["etc/.wh.group"].size == 0
    assert out["dev-null"].ischr() and out["hard"].linkname == "etc/passwd"


@pytest.mark.parametrize(("member", "match"), [
    (entry("/etc/passwd"), "unsafe name"),
    (entry("./../outside"), "unsafe name"),
    (entry("./a/../../b"), "unsafe name"),
    (entry("./.wh.sneaky"), "reserved"),
    (entry("./h", tarfile.LNKTYPE, linkname="/etc/shadow"), "unsafe name"),
    (entry("./h", tarfile.LNKTYPE, linkname="./not-in-it"), "hard link"),
])
def test_hostile_entries_are_refused(tmp_path: Path, member: tuple[tarfile.TarInfo, bytes | None],
                                     match: str) -> None:
    with pytest.raises(CommitError, match=match):
        converted(tmp_path, [member])


def test_the_layout_is_the_image_plus_one_layer_and_imports(tmp_path: Path) -> None:
    from ember.images import ImageStore
    from ember.images.commit import build_layout
    from ember.sample import write_busybox_image

    store = ImageStore(tmp_path / "images")
    base = store.import_path(write_busybox_image(tmp_path / "sample"), tag="base:1")
    upper = guest_tar(tmp_path / "upper.tar", [
        entry("./etc", tarfile.DIRTYPE), entry("./etc/made", data=b"made\n"),
        entry("./etc/group", tarfile.CHRTYPE, devmajor=0, devminor=0)])
    build_layout(store, base, upper, [], tmp_path / "layout", comment="c")
    new = store.import_path(tmp_path / "layout", tag="new:1")
    assert [x.digest for x in new.layers[:-1]] == [x.digest for x in base.layers]
    assert new.config == base.config  # the same command, env, user...
    doc = store.config_document(new)
    assert doc["history"][-1]["created_by"] == "ember commit"
    assert doc["history"][-1]["comment"] == "c"
    with gzip.open(store.blob_path(new.layers[-1].digest)) as f, tarfile.open(fileobj=f) as tf:
        assert sorted(tf.getnames()) == ["etc", "etc/.wh.group", "etc/made"]
