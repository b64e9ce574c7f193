"""Layer unpacking: OCI whiteout semantics, file types, metadata, and hostile layers."""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from images_helpers import (
    TarEntrySpec,
    device,
    directory,
    fifo,
    file,
    gzip_bytes,
    hardlink,
    layer_tar,
    opaque,
    sha256_digest,
    symlink,
    whiteout,
)

from ember.errors import ImageError, UnsafeLayer
from ember.images import oci
from ember.images.unpack import scan_layer, unpack_layer

IS_ROOT = os.geteuid() == 0


class Env:
    """A root to unpack into, next to an ``outside`` dir that must never change."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "root"
        self.root.mkdir()
        self.outside = tmp / "outside"
        self.outside.mkdir()
        (self.outside / "sentinel").write_text("keep")
        self.n = 0

    def apply(self, *layers: Sequence[TarEntrySpec], compression: str = "gzip") -> None:
        for entries in layers:
            self.n += 1
            tar = layer_tar(entries)
            path = self.tmp / f"layer{self.n}.tar"
            path.write_bytes(gzip_bytes(tar) if compression == "gzip" else tar)
            unpack_layer(path, self.root, compression=compression, name=f"layer{self.n}",
                         diff_id=sha256_digest(tar))

    def outside_listing(self) -> list[tuple[str, str]]:
        return sorted((str(p.relative_to(self.tmp)), p.read_text() if p.is_file() else "")
                      for p in self.outside.rglob("*"))

    def p(self, name: str) -> Path:
        return self.root / name


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def read(env: Env, name: str) -> str:
    return env.p(name).read_text()


def exists(env: Env, name: str) -> bool:
    return os.path.lexists(env.p(name))


# --- well-formed layers: (id, layers, check) ------------------------------------------

Check = Callable[[Env], None]
CASES: list[tuple[str, list[list[TarEntrySpec]], Check]] = []


def case(name: str, *layers: list[TarEntrySpec]) -> Callable[[Check], Check]:
    def deco(fn: Check) -> Check:
        CASES.append((name, list(layers), fn))
        return fn
    return deco


@case("files-and-implicit-parents", [file("a/b/c.txt", b"hello"), file("top", b"t")])
def _(env: Env) -> None:
    assert read(env, "a/b/c.txt") == "hello"
    assert stat.S_IMODE(os.stat(env.p("a/b")).st_mode) == 0o755
    assert read(env, "top") == "t"


@case("whiteout-file", [file("a/x", b"1"), file("a/y", b"2")], [whiteout("a/x")])
def _(env: Env) -> None:
    assert not exists(env, "a/x")
    assert read(env, "a/y") == "2"
    assert not exists(env, "a/.wh.x")


@case("whiteout-dir", [directory("d"), file("d/f"), directory("d/sub"), file("d/sub/g")],
      [whiteout("d")])
def _(env: Env) -> None:
    assert not exists(env, "d")


@case("whiteout-missing-is-noop", [file("a")], [whiteout("nothing"), whiteout("no/dir/x")])
def _(env: Env) -> None:
    assert exists(env, "a")
    assert not exists(env, "no")


@case("opaque-keeps-same-layer",
      [directory("d"), file("d/old", b"old"), directory("d/olddir"), file("keep")],
      # the opaque marker comes after the new entry: order in the tar must not matter
      [directory("d"), file("d/new", b"new"), opaque("d")])
def _(env: Env) -> None:
    assert sorted(os.listdir(env.p("d"))) == ["new"]
    assert read(env, "d/new") == "new"
    assert exists(env, "keep")


@case("whiteout-does-not-hit-same-layer", [file("a/x", b"old")],
      [file("a/x", b"new"), whiteout("a/x")])
def _(env: Env) -> None:
    assert read(env, "a/x") == "new"


@case("hardlink-same-layer", [file("a", b"data"), hardlink("b", "a"), hardlink("c", "./a")])
def _(env: Env) -> None:
    sa, sb, sc = (os.lstat(env.p(n)) for n in "abc")
    assert sa.st_ino == sb.st_ino == sc.st_ino and sa.st_nlink == 3


@case("hardlink-lower-layer", [file("bin/a", b"data")], [hardlink("bin/b", "bin/a")])
def _(env: Env) -> None:
    assert os.lstat(env.p("bin/a")).st_ino == os.lstat(env.p("bin/b")).st_ino


@case("symlinks-any-target",
      [symlink("abs", "/usr/lib"), symlink("up", "../../etc/passwd"), symlink("rel", "abs")])
def _(env: Env) -> None:
    assert os.readlink(env.p("abs")) == "/usr/lib"
    assert os.readlink(env.p("up")) == "../../etc/passwd"
    assert os.readlink(env.p("rel")) == "abs"


@case("relative-symlink-inside-is-followed",
      [directory("usr/lib"), symlink("lib", "usr/lib"), directory("x"),
       symlink("x/up", "../usr")],
      [file("lib/libc.so", b"c"), file("x/up/lib/other", b"o")])
def _(env: Env) -> None:
    assert read(env, "usr/lib/libc.so") == "c"
    assert read(env, "usr/lib/other") == "o"
    assert os.path.islink(env.p("lib"))


@case("symlink-at-final-component-is-replaced",
      [symlink("f", "../outside/sentinel"), symlink("g", "/etc/passwd")],
      [file("f", b"mine"), directory("g")])
def _(env: Env) -> None:
    assert not os.path.islink(env.p("f")) and read(env, "f") == "mine"
    assert os.path.isdir(env.p("g")) and not os.path.islink(env.p("g"))


@case("file-over-dir", [directory("d"), file("d/f"), directory("d/e")], [file("d", b"now a file")])
def _(env: Env) -> None:
    assert read(env, "d") == "now a file"


@case("dir-over-file", [file("x", b"f")], [directory("x", mode=0o750), file("x/y")])
def _(env: Env) -> None:
    assert os.path.isdir(env.p("x")) and exists(env, "x/y")
    assert stat.S_IMODE(os.stat(env.p("x")).st_mode) == 0o750


@case("dir-over-dir-merges", [directory("d", mode=0o755), file("d/lower")],
      [directory("d", mode=0o700), file("d/upper")])
def _(env: Env) -> None:
    assert sorted(os.listdir(env.p("d"))) == ["lower", "upper"]
    assert stat.S_IMODE(os.stat(env.p("d")).st_mode) == 0o700


@case("modes-and-mtimes",
      [directory("d", mode=0o711, mtime=1_000_000), file("d/x", mode=0o4755, mtime=2_000_000),
       file("ro", mode=0o400), directory("sticky", mode=0o1777)])
def _(env: Env) -> None:
    assert stat.S_IMODE(os.stat(env.p("d")).st_mode) == 0o711
    assert os.stat(env.p("d")).st_mtime == 1_000_000  # set after its children
    assert stat.S_IMODE(os.stat(env.p("d/x")).st_mode) == 0o4755
    assert os.stat(env.p("d/x")).st_mtime == 2_000_000
    assert stat.S_IMODE(os.stat(env.p("ro")).st_mode) == 0o400
    assert stat.S_IMODE(os.stat(env.p("sticky")).st_mode) == 0o1777


@case("root-entry-metadata", [directory(".", mode=0o751), file("./a")])
def _(env: Env) -> None:
    assert stat.S_IMODE(os.stat(env.root).st_mode) == 0o751
    assert exists(env, "a")


@case("fifo-and-devices-are-skipped",
      [fifo("run/pipe", mode=0o620), device("dev/null", "char"),
       device("dev/sda", "block", 8, 0), file("dev/keep")])
def _(env: Env) -> None:
    # never created on the host (the guest has its own /dev); the rest is there
    assert not os.path.lexists(env.p("run/pipe")) and not os.path.lexists(env.p("dev/null"))
    assert not os.path.lexists(env.p("dev/sda")) and exists(env, "dev/keep")


@case("unsupported-xattr-namespace-is-skipped",
      [file("f", b"x", xattrs={"bogus.attr": "1"})])
def _(env: Env) -> None:
    assert read(env, "f") == "x"


@pytest.mark.parametrize(("layers", "check"), [(c[1], c[2]) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_unpack_cases(env: Env, layers: list[list[TarEntrySpec]], check: Check) -> None:
    before = env.outside_listing()
    env.apply(*layers)
    check(env)
    assert env.outside_listing() == before


@pytest.mark.skipif(not IS_ROOT, reason="needs root to chown")
def test_ownership_is_preserved(env: Env) -> None:
    env.apply([directory("home/app", uid=1000, gid=1000),
               file("home/app/f", uid=1000, gid=2000, mode=0o2755),
               symlink("home/app/l", "f", uid=1000, gid=1000)])
    st = os.lstat(env.p("home/app/f"))
    assert (st.st_uid, st.st_gid) == (1000, 2000)
    assert stat.S_IMODE(st.st_mode) == 0o2755  # chmod after chown keeps setgid
    assert os.lstat(env.p("home/app")).st_uid == 1000
    assert os.lstat(env.p("home/app/l")).st_uid == 1000


def test_xattrs_are_applied(env: Env) -> None:
    probe = env.tmp / "probe"
    probe.write_text("")
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            pytest.skip("file system without user xattrs")
        raise
    env.apply([file("f", b"x", xattrs={"user.ember": "v\u00e9"})])
    assert os.getxattr(env.p("f"), "user.ember") == "v\u00e9".encode()


def test_uncompressed_and_fileobj(env: Env) -> None:
    env.apply([file("plain", b"p")], compression="none")
    assert read(env, "plain") == "p"
    tar = layer_tar([file("fromobj", b"o")])
    unpack_layer(io.BytesIO(gzip_bytes(tar)), env.root, compression="gzip")
    assert read(env, "fromobj") == "o"


def test_scan_reports_diff_id_and_whiteouts(tmp_path: Path) -> None:
    tar = layer_tar([file("a/b"), whiteout("a/c"), opaque("d"), file("d/.wh..wh.plnk")])
    scan = scan_layer(io.BytesIO(tar), compression="none")
    assert scan.diff_id == sha256_digest(tar)
    assert scan.size == len(tar) and scan.entries == 4
    assert scan.whiteouts == (("a", "c"),)
    assert scan.opaque_dirs == (("d",),)


# --- hostile layers ---------------------------------------------------------------------

HOSTILE: list[tuple[str, list[list[TarEntrySpec]], str]] = [
    ("dotdot", [[file("../outside/pwned")]], "'..'"),
    ("dotdot-inner", [[file("a/../../outside/pwned")]], "'..'"),
    ("absolute", [[file("/outside/pwned")]], "absolute"),
    ("abs-symlink-traversal", [[symlink("l", "/tmp"), file("l/pwned")]],
     "traverses a symlink that leaves the image"),
    ("rel-symlink-escape", [[symlink("l", "../outside"), file("l/pwned")]],
     "traverses a symlink that leaves the image"),
    ("rel-symlink-escape-nested",
     [[directory("a/b"), symlink("a/b/l", "../../.."), file("a/b/l/outside/pwned")]],
     "traverses a symlink"),
    ("symlink-escape-across-layers",
     [[symlink("l", "../outside")], [file("l/pwned")]], "traverses a symlink"),
    ("symlink-chain-escape",
     [[symlink("a", "b"), symlink("b", "c/.."), directory("c"), symlink("c/d", "../.."),
       file("a/c/d/outside/pwned")]], "traverses a symlink"),
    ("symlink-loop", [[symlink("a", "b"), symlink("b", "a"), file("a/x")]],
     "too many levels"),
    ("hardlink-dotdot", [[hardlink("h", "../outside/sentinel")]], "hardlink"),
    ("hardlink-absolute", [[hardlink("h", "/etc/passwd")]], "hardlink"),
    ("hardlink-through-symlink",
     [[symlink("l", "../outside"), hardlink("h", "l/sentinel")]], "traverses a symlink"),
    ("whiteout-through-symlink",
     [[symlink("l", "../outside")], [whiteout("l/sentinel")]], "traverses a symlink"),
    ("opaque-through-symlink", [[symlink("l", "../outside")], [opaque("l")]],
     "traverses a symlink"),
    ("whiteout-dotdot-name", [[file("a/.wh..."), file("x")]], "whiteout"),
]


@pytest.mark.parametrize(("layers", "message"), [(h[1], h[2]) for h in HOSTILE],
                         ids=[h[0] for h in HOSTILE])
def test_hostile_layers(env: Env, layers: list[list[TarEntrySpec]], message: str) -> None:
    before = env.outside_listing()
    with pytest.raises(UnsafeLayer) as info:
        env.apply(*layers)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert env.outside_listing() == before
    assert not (env.outside / "pwned").exists()


def test_statically_hostile_layer_writes_nothing_outside(env: Env) -> None:
    before = env.outside_listing()
    with pytest.raises(UnsafeLayer, match="escape"):
        env.apply([file("harmless"), file("../escape")])
    assert env.outside_listing() == before


def test_hardlink_to_missing_target(env: Env) -> None:
    with pytest.raises(ImageError, match="missing"):
        env.apply([hardlink("h", "nope")])


def test_file_as_parent_is_an_error(env: Env) -> None:
    with pytest.raises(ImageError, match="not a directory"):
        env.apply([file("f"), file("f/g")])


# --- corrupt layers ---------------------------------------------------------------------


def _tar(*entries: TarEntrySpec) -> bytes:
    return layer_tar(list(entries))


@pytest.mark.parametrize(("blob", "compression"), [
    (gzip_bytes(_tar(file("a", b"x" * 100_000)))[:-200], "gzip"),
    (gzip_bytes(_tar(file("a", b"x" * 100_000)))[:50], "gzip"),
    (b"this is not gzip at all", "gzip"),
    (_tar(file("a", os.urandom(50_000)))[:20_000], "none"),
    (b"\x01" * 1024, "none"),
], ids=["gzip-truncated-tail", "gzip-truncated-head", "not-gzip", "tar-truncated", "garbage"])
def test_corrupt_layers(env: Env, blob: bytes, compression: str) -> None:
    path = env.tmp / "bad"
    path.write_bytes(blob)
    with pytest.raises(ImageError, match=r"^layer sha256:abc is corrupt: ") as info:
        unpack_layer(path, env.root, compression=compression, name="sha256:abc")
    assert not isinstance(info.value, UnsafeLayer)


def test_diff_id_mismatch_fails_the_layer(env: Env) -> None:
    before = env.outside_listing()
    path = env.tmp / "l.tar"
    path.write_bytes(_tar(file("a")))
    with pytest.raises(ImageError, match="does not match diff_id"):
        unpack_layer(path, env.root, compression="none", name="sha256:abc",
                     diff_id=sha256_digest(b"other"))
    assert env.outside_listing() == before


@pytest.mark.skipif(not oci.zstd_available(), reason="no zstd decompressor")
def test_zstd_layer(env: Env) -> None:
    tar = layer_tar([file("z/file", b"zstd data"), symlink("z/l", "file")])
    if shutil.which("zstd"):
        blob = subprocess.run(["zstd", "-q", "-c"], input=tar, capture_output=True,
                              check=True).stdout
    else:  # pragma: no cover - the zstandard module instead of the tool
        import zstandard  # type: ignore[import-not-found]
        blob = zstandard.ZstdCompressor().compress(tar)
    path = env.tmp / "l.tar.zst"
    path.write_bytes(blob)
    unpack_layer(path, env.root, compression="zstd", diff_id=sha256_digest(tar))
    assert read(env, "z/file") == "zstd data"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ImageError, match="is corrupt"):
        unpack_layer(path, env.root, compression="zstd", name="sha256:z")


def test_scan_counts_the_skipped_specials_and_says_so_in_one_line(tmp_path: Path) -> None:
    from ember.images.unpack import scan_layer, skipped_message

    layer = tmp_path / "l.tar"
    layer.write_bytes(layer_tar([device("dev/full"), device("dev/zero"), fifo("p"),
                                 device("dev/tty", "char", 5, 0), file("f")]))
    scan = scan_layer(layer, compression="none")
    assert scan.skipped == 4 and scan.skipped_names == ("dev/full", "dev/zero", "p")
    line = skipped_message(scan, "sha256:abc")
    assert "skipped 4 device node(s)/FIFO(s) (dev/full, dev/zero, p, ...)" in line
    assert "\n" not in line
