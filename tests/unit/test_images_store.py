"""The image store: import (OCI layouts, OCI archives, docker saves), tags, rm, rootfs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from images_helpers import (
    BUSYBOX,
    BUSYBOX_APPLETS,
    LAYER_GZIP,
    LAYER_TAR,
    TarEntrySpec,
    device,
    directory,
    docker_archive_image_id,
    file,
    gzip_bytes,
    layer_tar,
    layout_blob,
    layout_image_id,
    layout_manifest,
    opaque,
    symlink,
    tar_directory,
    whiteout,
    write_busybox_layout,
    write_docker_archive,
    write_oci_layout,
)

from ember.errors import AmbiguousImage, ImageConflict, ImageError, ImageNotFound, UnsafeLayer
from ember.images import Image, ImageStore, normalize_tag
from ember.images.store import Removal, TagMove, tag_moved_message

BASE = [directory("etc"), file("etc/os-release", b"NAME=test\n"), directory("usr/lib"),
        file("usr/lib/a", b"a"), file("usr/lib/b", b"b"), directory("var/cache"),
        file("var/cache/junk", b"j")]
MIDDLE = [whiteout("usr/lib/a"), file("usr/lib/c", b"c"), opaque("var/cache"),
          file("var/cache/new", b"n")]
TOP = [file("app/run.sh", b"#!/bin/sh\necho hi\n", mode=0o755), symlink("lib", "usr/lib")]
CONFIG = {"Entrypoint": ["/app/run.sh"], "Cmd": ["--x"], "Env": ["A=1"], "WorkingDir": "/app"}


def tree(root: Path) -> list[tuple[str, str]]:
    """Every file and dir under root with a content hash: for before/after comparisons."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out.append((str(p.relative_to(root)), hashlib.sha256(p.read_bytes()).hexdigest()))
        else:
            out.append((str(p.relative_to(root)), "dir" if p.is_dir() else "other"))
    return out


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    return write_oci_layout(tmp_path / "layout", [BASE, MIDDLE, TOP], CONFIG, ref_name="demo:1")


def blobs(store: ImageStore) -> set[str]:
    return {p.name for p in store.blobs_dir.iterdir()}


# --- importing ------------------------------------------------------------------------------


def test_import_oci_layout(store: ImageStore, layout: Path) -> None:
    lines: list[str] = []
    image = store.import_path(layout, progress=lines.append)
    assert image.id == layout_image_id(layout)
    assert image.short_id == image.id[7:19]
    assert image.tags == ("demo:1",)
    assert image.config.entrypoint == ("/app/run.sh",) and image.config.working_dir == "/app"
    assert len(image.layers) == 3 and image.size > 0
    assert image.created == "2024-01-01T00:00:00Z"
    index = json.loads((layout / "index.json").read_text())
    assert image.manifest_digest == index["manifests"][0]["digest"]
    assert "importing layer 2/3 (" in "\n".join(lines)
    # every blob of the layout is in the store, nothing else
    assert blobs(store) == {p.name for p in (layout / "blobs" / "sha256").iterdir()}
    assert [p.name for p in store.blobs_dir.parent.parent.joinpath("blobs/sha256").iterdir()
            if p.name.startswith(".")] == []
    record = json.loads((store.root / "images" / f"{image.hex}.json").read_text())
    assert record["id"] == image.id and record["tags"] == ["demo:1"]
    assert len(record["diff_ids"]) == 3
    assert json.loads((store.root / "refs.json").read_text()) == {"demo:1": image.id}
    assert store.list() == [image]


def test_import_oci_archive_and_name_normalisation(store: ImageStore, tmp_path: Path) -> None:
    lay = write_oci_layout(tmp_path / "l", [BASE], {"Cmd": ["sh"]}, ref_name="docker.io/x/y")
    image = store.import_path(tar_directory(lay, tmp_path / "oci.tar"))
    assert image.tags == ("x/y:latest",)
    assert store.resolve("x/y").id == image.id


def test_import_docker_save(store: ImageStore, tmp_path: Path) -> None:
    archive = write_docker_archive(tmp_path / "save.tar", [BASE, MIDDLE, TOP], CONFIG,
                                   repo_tags=["web:2", "web:latest"])
    image = store.import_path(archive)
    assert image.id == docker_archive_image_id(archive)
    assert image.tags == ("web:2", "web:latest")
    assert image.manifest_digest is None
    assert [layer.media_type for layer in image.layers] == \
        ["application/vnd.oci.image.layer.v1.tar"] * 3


def test_import_gzipped_docker_save_and_explicit_tag(store: ImageStore, tmp_path: Path) -> None:
    archive = write_docker_archive(tmp_path / "save.tar", [BASE], {"Cmd": ["sh"]},
                                   repo_tags=None)
    gz = tmp_path / "save.tar.gz"
    gz.write_bytes(gzip.compress(archive.read_bytes()))
    image = store.import_path(gz, tag="mine")
    assert image.tags == ("mine:latest",)


def test_import_without_any_tag(store: ImageStore, tmp_path: Path) -> None:
    image = store.import_path(write_oci_layout(tmp_path / "l", [BASE], {"Cmd": ["sh"]}))
    assert image.tags == ()
    assert store.resolve(image.short_id) == image


def test_reimport_is_a_noop_that_adds_tags(store: ImageStore, layout: Path) -> None:
    first = store.import_path(layout)
    before = tree(store.blobs_dir)
    lines: list[str] = []
    again = store.import_path(layout, tag="other:tag", progress=lines.append)
    assert again.id == first.id
    assert again.tags == ("demo:1", "other:tag")
    assert tree(store.blobs_dir) == before
    assert any("already in the store" in line for line in lines)
    assert len(store.list()) == 1


def test_tag_moves_between_images(store: ImageStore, tmp_path: Path) -> None:
    a = store.import_path(write_oci_layout(tmp_path / "a", [BASE], {"Cmd": ["a"]}), tag="t")
    b = store.import_path(write_oci_layout(tmp_path / "b", [BASE], {"Cmd": ["b"]}), tag="t")
    assert store.resolve("t").id == b.id
    assert store.resolve(a.id).tags == ()
    store.tag(a.short_id, "u:1")
    assert store.resolve("u:1").id == a.id


# --- resolving ------------------------------------------------------------------------------


def test_resolve_forms(store: ImageStore, layout: Path) -> None:
    image = store.import_path(layout, tag="demo")
    for ref in ("demo", "demo:latest", image.id, image.hex, image.hex[:6], image.short_id,
                "sha256:" + image.hex[:10], f"  {image.short_id} ", image.hex[:1],
                image.hex[:2], "sha256:" + image.hex[:1]):
        assert store.resolve(ref).id == image.id, ref
    other = next(c for c in "0123456789abcdef" if c != image.hex[0])
    with pytest.raises(ImageNotFound):
        store.resolve(other + image.hex[1:8])


def distinct_images(store: ImageStore, tmp: Path) -> list[Image]:
    """Import images until two ids start with the same hex digit; those two (deterministic)."""
    seen: dict[str, Image] = {}
    for i in range(40):
        img = store.import_path(write_oci_layout(tmp / f"p{i}", [BASE], {"Cmd": [str(i)]}))
        if img.hex[0] in seen:
            return [seen[img.hex[0]], img]
        seen[img.hex[0]] = img
    raise AssertionError("40 images and no shared first digit")


def test_any_unique_id_prefix_names_an_image_and_an_ambiguous_one_says_how_many(
        store: ImageStore, tmp_path: Path) -> None:
    a, b = distinct_images(store, tmp_path)
    common = os.path.commonprefix([a.hex, b.hex])
    with pytest.raises(AmbiguousImage) as info:
        store.resolve(common)
    assert str(info.value) == (f"image id prefix {common!r} is ambiguous: 2 images match "
                               "(give more of the id)")
    assert store.resolve(a.hex[:len(common) + 1]).id == a.id
    assert store.resolve(b.hex[:len(common) + 1]).id == b.id
    # a tag spelled like an id prefix wins, as in Docker
    store.tag(b.id, a.hex[:3])
    assert store.resolve(a.hex[:3]).id == b.id
    assert store.resolve("sha256:" + a.hex[:3]).id == a.id


@pytest.mark.parametrize("ref", ["nope", "demo:2", "sha256:" + "0" * 64, "zzzzzzzz",
                                 "../etc", ""])
def test_resolve_not_found(store: ImageStore, layout: Path, ref: str) -> None:
    store.import_path(layout, tag="demo")
    with pytest.raises(ImageNotFound) as info:
        store.resolve(ref)
    assert "\n" not in str(info.value)


def test_resolve_on_empty_store(tmp_path: Path) -> None:
    s = ImageStore(tmp_path / "never-created")
    assert s.list() == []
    with pytest.raises(ImageNotFound):
        s.resolve("x")
    assert not (tmp_path / "never-created").exists()


@pytest.mark.parametrize(("tag", "expected"), [
    ("busybox", "busybox:latest"), ("busybox:1.36", "busybox:1.36"),
    ("docker.io/library/alpine", "alpine:latest"), ("docker.io/foo/bar:1.0", "foo/bar:1.0"),
    ("localhost:5000/x", "localhost:5000/x:latest"), ("a/b-c_d.e:v1.2-3", "a/b-c_d.e:v1.2-3"),
])
def test_normalize_tag(tag: str, expected: str) -> None:
    assert normalize_tag(tag) == expected


@pytest.mark.parametrize("tag", ["", "../x", "a/../b", "a//b", "/abs", "x:", "x/", "a b",
                                 "sha256:" + "1" * 64, "x:y:z", "-x", "a\nb", "x" * 300])
def test_normalize_tag_rejects(tag: str) -> None:
    with pytest.raises(ImageError, match="invalid image tag"):
        normalize_tag(tag)


# --- removing -------------------------------------------------------------------------------


def disk(store: ImageStore) -> int:
    """Bytes of the store's images: blobs, root file systems, records."""
    return sum(p.stat().st_size for d in (store.blobs_dir, store.rootfs_dir, store.images_dir)
               for p in d.iterdir() if p.is_file())


def test_removing_the_last_tag_deletes_the_image_and_its_unshared_blobs(
        store: ImageStore, tmp_path: Path) -> None:
    a = store.import_path(write_oci_layout(tmp_path / "a", [BASE, MIDDLE], {"Cmd": ["a"]}),
                          tag="a")
    b = store.import_path(write_oci_layout(tmp_path / "b", [BASE, TOP], {"Cmd": ["b"]}),
                          tag="b")
    base_blob = a.layers[0].digest
    assert b.layers[0].digest == base_blob
    before = disk(store)
    removed = store.remove("a")
    assert (removed.untagged, removed.deleted) == (("a:latest",), (a.id,))
    assert removed.reclaimed == before - disk(store) > 0
    assert store.blob_path(base_blob).exists()
    assert not store.blob_path(a.layers[1].digest).exists()
    assert not store.blob_path(a.id).exists()
    assert not store.rootfs_path(a).exists() and store.rootfs_path(b).exists()
    assert [i.id for i in store.list()] == [b.id]
    with pytest.raises(ImageNotFound):
        store.resolve("a")
    assert store.remove(b.id).deleted == (b.id,)
    assert list(store.blobs_dir.iterdir()) == []
    assert list(store.images_dir.iterdir()) == []
    assert list(store.rootfs_dir.iterdir()) == []
    assert json.loads(store.refs_path.read_text()) == {}


def test_removing_one_of_several_tags_only_untags(store: ImageStore, layout: Path) -> None:
    image = store.import_path(layout, tag="app:1")
    store.tag("app:1", "app:latest")
    before = tree(store.blobs_dir)
    assert store.remove("app") == Removal(untagged=("app:latest",))
    assert store.resolve("app:1").tags == ("app:1",)
    assert tree(store.blobs_dir) == before and store.rootfs_path(image).exists()
    record = json.loads(store._record_path(image.id).read_text())
    assert record["tags"] == ["app:1"]
    assert store.remove("app:1").deleted == (image.id,)


def test_removing_by_id_an_image_with_several_tags_needs_force(store: ImageStore,
                                                               layout: Path) -> None:
    image = store.import_path(layout, tag="app:1")
    store.tag(image.id, "app:2")
    before = tree(store.root)
    with pytest.raises(ImageConflict) as info:
        store.remove(image.short_id)
    assert str(info.value) == (f"image {image.short_id} has 2 tags (app:1, app:2): remove "
                               "them by name, or force to remove all")
    assert tree(store.root) == before
    removed = store.remove(image.short_id, force=True)
    assert (removed.untagged, removed.deleted) == (("app:1", "app:2"), (image.id,))
    assert store.list() == []


def test_an_image_a_machine_uses_is_never_deleted(store: ImageStore, layout: Path) -> None:
    image = store.import_path(layout, tag="app:1")
    store.tag(image.id, "app:2")
    users = {image.id: ["web", "db"]}
    # a tag that is not the last one goes: the machines have the image by id
    assert store.remove("app:2", users=users) == Removal(untagged=("app:2",))
    before = tree(store.root)
    for ref in ("app:1", image.id):
        with pytest.raises(ImageConflict) as info:
            store.remove(ref, users=users)
        assert "is used by machine web (and 1 more): remove the machine first, or force" \
            in str(info.value)
        assert tree(store.root) == before
    # forced: the tag goes, the image stays (untagged) for as long as it is used
    assert store.remove("app:1", force=True, users=users) == Removal(untagged=("app:1",))
    kept = store.resolve(image.id)
    assert kept.tags == () and store.rootfs_path(kept).exists()
    with pytest.raises(ImageConflict, match="has no tags to remove"):
        store.remove(image.id, force=True, users=users)
    assert store.prune(users=users) == Removal()
    assert store.prune(all=True, users=users) == Removal()
    assert store.resolve(image.id).id == image.id
    # once unused, prune takes it
    assert store.prune(users={image.id: []}).deleted == (image.id,)
    assert store.list() == [] and list(store.blobs_dir.iterdir()) == []


def test_prune_deletes_untagged_images_and_with_all_every_unused_one(
        store: ImageStore, tmp_path: Path) -> None:
    dangling = store.import_path(write_oci_layout(tmp_path / "d", [BASE], {"Cmd": ["d"]}))
    tagged = store.import_path(write_oci_layout(tmp_path / "t", [BASE, TOP], {"Cmd": ["t"]}),
                               tag="t:1")
    used = store.import_path(write_oci_layout(tmp_path / "u", [MIDDLE], {"Cmd": ["u"]}),
                             tag="u:1")
    users = {used.id: ["web"]}
    before = disk(store)
    pruned = store.prune(users=users)
    assert (pruned.untagged, pruned.deleted) == ((), (dangling.id,))
    assert pruned.reclaimed == before - disk(store) > 0
    assert store.blob_path(tagged.layers[0].digest).exists()  # shared with the dangling one
    before = disk(store)
    pruned = store.prune(all=True, users=users)
    assert (pruned.untagged, pruned.deleted) == (("t:1",), (tagged.id,))
    assert pruned.reclaimed == before - disk(store) > 0
    assert [i.tags for i in store.list()] == [("u:1",)]
    assert store.prune(all=True, users=users) == Removal()


def test_prune_collects_what_a_killed_removal_left(store: ImageStore, layout: Path,
                                                  tmp_path: Path) -> None:
    image = store.import_path(layout, tag="keep")
    orphan_blob = store.blobs_dir / ("ab" * 32)
    orphan_blob.write_bytes(b"x" * 100)
    orphan_rootfs = store.rootfs_dir / (("cd" * 32) + ".erofs")
    orphan_rootfs.write_bytes(b"y" * 50)
    assert store.prune() == Removal(reclaimed=150)
    assert not orphan_blob.exists() and not orphan_rootfs.exists()
    assert store.resolve("keep").id == image.id and store.rootfs_path(image).exists()
    # with a record it cannot read, prune cannot know what that image needs: it keeps blobs
    orphan_blob.write_bytes(b"x")
    (store.images_dir / ("ef" * 32 + ".json")).write_text("{not json")
    assert store.prune() == Removal()
    assert orphan_blob.exists()


def test_remove_unknown(store: ImageStore) -> None:
    with pytest.raises(ImageNotFound):
        store.remove("ghost")


def test_an_import_that_takes_a_tag_says_so_and_leaves_the_old_image_to_prune(
        store: ImageStore, tmp_path: Path) -> None:
    old = store.import_path(write_oci_layout(tmp_path / "a", [BASE], {"Cmd": ["a"]},
                                             ref_name="app:1"))
    result = store.import_archive(
        write_docker_archive(tmp_path / "b.tar", [BASE], {"Cmd": ["b"]}, repo_tags=["app:1"]))
    assert result.moved == (TagMove("app:1", old.id, result.image.id),) and result.new
    assert tag_moved_message(result.moved[0]) == f"tag app:1 moved from image {old.short_id}"
    assert store.resolve("app:1").id == result.image.id
    assert store.resolve(old.id).tags == ()
    assert json.loads(store._record_path(old.id).read_text())["tags"] == []
    assert store.prune().deleted == (old.id,)
    again = store.import_archive(write_oci_layout(tmp_path / "c", [BASE], {"Cmd": ["c"]}),
                                 tag="app:1")
    assert again.moved == (TagMove("app:1", result.image.id, again.image.id),)
    assert not store.import_archive(tmp_path / "c", tag="app:1").moved
    # re-importing an image the store has takes its tags back too
    back = store.import_archive(tmp_path / "b.tar")
    assert not back.new and back.moved == (TagMove("app:1", again.image.id, result.image.id),)


# --- bad input leaves the store untouched ---------------------------------------------------

Breaker = Callable[[Path], Path]


def _layout(tmp: Path, layers: Sequence[Sequence[TarEntrySpec] | bytes] | None = None,
            **kw: Any) -> Path:
    return write_oci_layout(tmp / "bad", layers or [BASE, MIDDLE, TOP], CONFIG, **kw)


def _blob_of_layer(lay: Path, i: int) -> Path:
    return layout_blob(lay, layout_manifest(lay)["layers"][i]["digest"])


def digest_mismatch(tmp: Path) -> Path:
    lay = _layout(tmp)
    blob = _blob_of_layer(lay, 2)
    os.chmod(blob, 0o644)
    blob.write_bytes(gzip_bytes(layer_tar([file("evil", b"swapped")])))
    return lay


def truncated_blob(tmp: Path) -> Path:
    lay = _layout(tmp)
    blob = _blob_of_layer(lay, 1)
    blob.write_bytes(blob.read_bytes()[:-10])
    return lay


def missing_layer(tmp: Path) -> Path:
    lay = _layout(tmp)
    _blob_of_layer(lay, 2).unlink()
    return lay


def missing_config(tmp: Path) -> Path:
    lay = _layout(tmp)
    layout_blob(lay, layout_manifest(lay)["config"]["digest"]).unlink()
    return lay


def invalid_config(tmp: Path) -> Path:
    return _layout(tmp, full_config={"architecture": "amd64", "os": "linux"})


def diff_id_mismatch(tmp: Path) -> Path:
    return _layout(tmp, full_config={"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": ["sha256:" + "ab" * 32] * 3}})


def unsupported_media_type(tmp: Path) -> Path:
    return _layout(tmp, layer_media_types=[
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+bzip2"])


def hostile_layer(tmp: Path) -> Path:
    return _layout(tmp, [BASE, MIDDLE, [file("ok"), file("../../escape")]])


def device_layer(tmp: Path) -> Path:
    return _layout(tmp, [BASE, [device("dev/kmem")]])


def corrupt_gzip_layer(tmp: Path) -> Path:
    """A layer whose blob digest is right but whose gzip stream is broken."""
    good = gzip_bytes(layer_tar(TOP))
    return _layout(tmp, [BASE, MIDDLE, good[:-30]], compression="none",
                   layer_media_types=[LAYER_TAR, LAYER_TAR, LAYER_GZIP])


def truncated_docker_save(tmp: Path) -> Path:
    archive = write_docker_archive(tmp / "save.tar", [BASE, TOP], CONFIG)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) * 2 // 3])
    return archive


def docker_layer_modified(tmp: Path) -> Path:
    archive = write_docker_archive(tmp / "save.tar", [BASE, TOP], CONFIG)
    out = tmp / "mod.tar"
    with tarfile.open(archive) as src, tarfile.open(out, "w") as dst:
        for m in src.getmembers():
            f = src.extractfile(m)
            data = f.read() if f else b""
            if m.name.endswith("layer.tar") and b"run.sh" in data:
                data = layer_tar([file("app/run.sh", b"#!/bin/sh\nrm -rf /\n")])
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    return out


def docker_config_name_mismatch(tmp: Path) -> Path:
    archive = write_docker_archive(tmp / "save.tar", [BASE], CONFIG)
    out = tmp / "mod.tar"
    with tarfile.open(archive) as src, tarfile.open(out, "w") as dst:
        for m in src.getmembers():
            f = src.extractfile(m)
            data = f.read() if f else b""
            if m.name.endswith(".json") and m.name != "manifest.json":
                data = data.replace(b'"Cmd"', b'"Cmd" ')
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    return out


def unsafe_archive_path(tmp: Path) -> Path:
    d = tmp / "dsave"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps(
        [{"Config": "../../etc/passwd", "RepoTags": ["x"], "Layers": []}]))
    return d


def not_an_image(tmp: Path) -> Path:
    d = tmp / "empty"
    d.mkdir()
    (d / "README").write_text("hi")
    return d


def garbage_file(tmp: Path) -> Path:
    p = tmp / "garbage.tar"
    p.write_bytes(os.urandom(3000))
    return p


BAD: list[tuple[Breaker, str]] = [
    (digest_mismatch, "does not match its digest"),
    (truncated_blob, "does not match its digest"),
    (missing_layer, "missing layer 3/3"),
    (missing_config, "missing the config blob"),
    (invalid_config, "rootfs"),
    (diff_id_mismatch, "does not match diff_id"),
    (unsupported_media_type, "unsupported layer media type"),
    (hostile_layer, "'..'"),
    (corrupt_gzip_layer, "is corrupt: "),
    (truncated_docker_save, "is not a readable tar archive: unexpected end of data"),
    (docker_layer_modified, "does not match diff_id"),
    (docker_config_name_mismatch, "does not match its digest"),
    (unsafe_archive_path, "unsafe path"),
    (not_an_image, "neither an OCI image layout nor a docker save"),
    (garbage_file, "not a readable tar"),
]


@pytest.mark.parametrize(("breaker", "message"), BAD, ids=[b[0].__name__ for b in BAD])
def test_bad_input_leaves_store_untouched(store: ImageStore, tmp_path: Path,
                                          breaker: Breaker, message: str) -> None:
    other = tmp_path / "other"
    other.mkdir()
    store.import_path(write_oci_layout(other / "l", [BASE], {"Cmd": ["sh"]}), tag="keep")
    before = tree(store.root)
    bad = breaker(tmp_path)
    with pytest.raises(ImageError) as info:
        store.import_path(bad, tag="bad:1")
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert tree(store.root) == before


def test_device_nodes_in_a_layer_are_skipped_not_refused(
        store: ImageStore, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    image = store.import_path(device_layer(tmp_path), tag="dev:1")
    with caplog.at_level("WARNING", logger="ember"):
        rootfs = store.rootfs(image)
    assert rootfs.is_file()
    assert [r.getMessage() for r in caplog.records if "skipped 1 device" in r.getMessage()]


def test_hostile_layer_is_unsafe_layer(store: ImageStore, tmp_path: Path) -> None:
    with pytest.raises(UnsafeLayer):
        store.import_path(hostile_layer(tmp_path))
    assert blobs(store) == set()


def test_invalid_tag_argument(store: ImageStore, layout: Path) -> None:
    with pytest.raises(ImageError, match="invalid image tag"):
        store.import_path(layout, tag="../../x")
    assert store.list() == []


def test_import_missing_path(store: ImageStore, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        store.import_path(tmp_path / "nothing")


# --- rootfs ------------------------------------------------------------------------------

needs_erofs = pytest.mark.skipif(not shutil.which("mkfs.erofs"), reason="needs erofs-utils")
EROFS_MAGIC = 0xE0F5E1E2


def erofs_extract(image: Path, dest: Path) -> Path:
    if not shutil.which("fsck.erofs"):
        pytest.skip("needs fsck.erofs")
    subprocess.run(["fsck.erofs", f"--extract={dest}", str(image)], check=True,
                   capture_output=True)
    return dest


@needs_erofs
@pytest.mark.skipif(not BUSYBOX.exists(), reason="needs /bin/busybox")
def test_rootfs_builds_erofs(store: ImageStore, tmp_path: Path) -> None:
    lay = write_busybox_layout(tmp_path / "bb", extra_layers=[
        [file("etc/motd", b"hello\n"), directory("data", uid=1000, gid=1000),
         file("data/gone", b"x")],
        [whiteout("data/gone"), file("usr/bin/tool", b"#!/bin/sh\n", mode=0o755)],
    ])
    lines: list[str] = []
    image = store.import_path(lay, progress=lines.append)
    assert image.tags == ("busybox:latest",)
    # the import built the rootfs; asking for it is a cache hit
    assert any("building rootfs for sha256:" in line and "(erofs)" in line for line in lines)
    path = store.rootfs_path(image)
    assert path.exists()
    assert store.rootfs(image, progress=lines.append) == path
    with open(path, "rb") as f:
        f.seek(1024)
        assert int.from_bytes(f.read(4), "little") == EROFS_MAGIC
    assert list(store.tmp_dir.iterdir()) == []
    assert [p.name for p in store.rootfs_dir.iterdir()] == [path.name]

    root = erofs_extract(path, tmp_path / "x")
    assert (root / "bin/busybox").read_bytes() == BUSYBOX.read_bytes()
    for applet in BUSYBOX_APPLETS:
        assert os.readlink(root / "bin" / applet) == "busybox"
    assert "app:x:1000:1000" in (root / "etc/passwd").read_text()
    assert (root / "etc/motd").read_text() == "hello\n"
    assert not (root / "data/gone").exists()
    for d in ("dev", "proc", "sys", "run", "etc"):
        assert (root / d).is_dir()
    assert stat.S_IMODE(os.stat(root / "tmp").st_mode) == 0o1777
    if os.geteuid() == 0:
        assert os.stat(root / "data").st_uid == 1000

    # cached: same path, not rebuilt
    mtime = path.stat().st_mtime_ns
    assert store.rootfs(image) == path and path.stat().st_mtime_ns == mtime
    store.remove(image.id)
    assert not path.exists()


@needs_erofs
def test_import_fails_cleanly_on_layer_escaping_through_symlink(store: ImageStore,
                                                                 tmp_path: Path) -> None:
    # Each layer is fine alone; together the second writes through the first's symlink.
    lay = write_oci_layout(tmp_path / "l", [[symlink("etc", "../../..")], [file("etc/x")]],
                           {"Cmd": ["sh"]})
    def files() -> list[Path]:
        return sorted(p.relative_to(store.root) for p in store.root.rglob("*")
                      if p.is_file() and p.name != "lock")

    before = files()
    with pytest.raises(UnsafeLayer, match="leaves the image"):
        store.import_path(lay)
    assert files() == before
    assert store.list() == []


# --- archives written by real tools --------------------------------------------------------

needs_skopeo = pytest.mark.skipif(not shutil.which("skopeo"), reason="needs skopeo")


def skopeo(*args: str) -> None:
    subprocess.run(["skopeo", "--insecure-policy", *args], check=True, capture_output=True,
                   timeout=120)


@needs_skopeo
@pytest.mark.parametrize("dest", ["docker-archive:{tmp}/d.tar:library/demo:3",
                                  "oci-archive:{tmp}/o.tar:demo:3",
                                  "oci:{tmp}/copy:demo:3"])
def test_import_archives_written_by_skopeo(store: ImageStore, layout: Path, tmp_path: Path,
                                           dest: str) -> None:
    target = dest.format(tmp=tmp_path)
    skopeo("copy", f"oci:{layout}:demo:1", target)
    path = Path(target.split(":", 2)[1])
    image: Image = store.import_path(path)
    # skopeo keeps the config, so the id is stable across formats
    assert image.id == layout_image_id(layout)
    assert image.tags == ("demo:3",)
    assert image.config.entrypoint == ("/app/run.sh",)
    if shutil.which("mkfs.erofs") and shutil.which("fsck.erofs"):
        root = erofs_extract(store.rootfs(image), tmp_path / "x")
        assert (root / "usr/lib/c").read_text() == "c"
        assert not (root / "usr/lib/a").exists()
        assert sorted(os.listdir(root / "var/cache")) == ["new"]
        assert os.readlink(root / "lib") == "usr/lib"


def test_leftover_temporaries_are_swept(store: ImageStore, layout: Path, tmp_path: Path) -> None:
    store.import_path(layout)
    stale = [store.blobs_dir / ".tmp-dead", store.rootfs_dir / ".abc.erofs.x.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    (store.tmp_dir / "unpack-dead" / "d").mkdir(parents=True)
    store.import_path(write_oci_layout(tmp_path / "l2", [BASE], {"Cmd": ["sh"]}))
    assert not any(p.exists() for p in stale)
    assert list(store.tmp_dir.iterdir()) == []


def test_resolve_by_manifest_digest(store: ImageStore, layout: Path) -> None:
    image = store.import_path(layout)
    assert image.manifest_digest is not None
    assert store.resolve(image.manifest_digest).id == image.id


def test_unpacked_trees_left_in_memory_by_dead_processes_are_swept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ember.images import rootfs

    monkeypatch.setattr(rootfs, "MEMORY_DIR", tmp_path)
    dead = tmp_path / f"{rootfs.MEMORY_PREFIX}999999999-abc-x"
    alive = tmp_path / f"{rootfs.MEMORY_PREFIX}{os.getpid()}-abc-y"
    for d in (dead, alive):
        (d / "etc").mkdir(parents=True)
    rootfs.sweep_memory_scratch()
    assert not dead.exists() and alive.exists()
