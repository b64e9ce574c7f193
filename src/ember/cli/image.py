"""``ember image``: import, sample, ls, inspect, tag, rm and prune, through the daemon.

Only the daemon knows which machines use an image, so every image command asks
it (as ``docker image`` asks dockerd): one source of truth, also for a daemon
elsewhere (``EMBER_HOST``). An import gives the daemon the path when it runs on
this host (its Unix socket) and uploads the archive otherwise. ``ember run
IMAGE`` in the foreground is the exception: it boots from the local store.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ember.cli.common import (
    client,
    each,
    help_command,
    inspect_each,
    progress,
)
from ember.errors import EmberError

if TYPE_CHECKING:
    from ember.api.models import Image, ImageImported, ImageRemoval
    from ember.sdk import Client
    from ember.util import Progress


# ---------------------------------------------------------------- import


def import_image(c: Client, path: str, tag: str | None, say: Progress) -> ImageImported:
    """Import the OCI layout or docker-save archive at ``path`` (on this host) into the
    daemon's store; tags the import took from other images are reported on stderr."""
    from ember.images import human_size
    from ember.util import stderr_progress

    p = Path(path)
    if not p.exists():
        raise EmberError(f"{path} does not exist")
    if not (p.is_dir() or p.is_file()):
        raise EmberError(f"{path} is neither a directory nor a file")
    size = _size(p)
    if c.endpoint.socket_path is not None:
        say(f"importing {path} ({human_size(size)})")
        result = c.images.import_path(p.absolute(), tag)
    elif p.is_dir():
        say(f"uploading {path} ({human_size(size)}, as a tar) to {c.endpoint.describe()}")
        with tempfile.TemporaryFile() as f:
            _tar_dir(p, f)
            f.seek(0)
            result = c.images.upload(f, tag)
    else:
        say(f"uploading {path} ({human_size(size)}) to {c.endpoint.describe()}")
        result = c.images.upload(p, tag)
    for move in result.moved_tags:  # said even with -q: another image just lost a name
        stderr_progress(f"tag {move.tag} moved from image {_short(move.from_image)}")
    say(f"imported {result.short_id}" + (f" as {', '.join(result.tags)}" if result.tags
                                         else ""))
    return result


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _tar_dir(root: Path, out: IO[bytes]) -> None:
    """An image layout directory as a tar (entries relative to it), for an upload."""
    import tarfile

    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(os.listdir(root)):
            tf.add(root / name, arcname=name)


def _short(image_id: str) -> str:
    return image_id.split(":", 1)[-1][:12]


def cmd_image_import(args: argparse.Namespace) -> int:
    with client() as c:
        image = import_image(c, args.path, args.tag, progress(args))
    print(image.id)
    return 0


def cmd_image_sample(args: argparse.Namespace) -> int:
    from ember.sample import BUSYBOX, write_busybox_image

    if not BUSYBOX.is_file():
        raise EmberError(f"the sample image is made from the host's static busybox, and "
                         f"{BUSYBOX} is missing (apt-get install busybox-static)")
    say = progress(args)
    with tempfile.TemporaryDirectory(prefix="ember-sample-") as tmp, client() as c:
        say(f"writing the busybox sample image (OCI layout) in {tmp}")
        layout = write_busybox_image(Path(tmp) / "sample")
        image = import_image(c, str(layout), args.tag, say)
    print(image.id)
    return 0


# ---------------------------------------------------------------- ls / inspect


def cmd_image_ls(args: argparse.Namespace) -> int:
    from ember.images import human_size

    with client() as c:
        images = c.images.list()
    if args.json:
        print(json.dumps([
            {"id": i.id, "tags": list(i.tags), "size": i.size, "created": i.created,
             "pulled_as": i.pulled_as, "repo_digests": list(i.repo_digests)}
            for i in images
        ], indent=2))
        return 0
    if args.quiet:
        for i in images:
            print(i.short_id)
        return 0
    rows = [("ID", "TAGS", "SIZE", "CREATED", "PULLED AS", "DIGEST")]
    for i in images:
        tags = ", ".join(i.tags) or "<none>"
        digest = i.repo_digests[-1].split("@", 1)[1][:19] + "…" if i.repo_digests else ""
        rows.append((i.short_id, tags, human_size(i.size), i.created or "",
                     i.pulled_as or "", digest))
    widths = [max(len(r[col]) for r in rows) for col in range(6)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


def inspect_doc(image: Image) -> dict[str, Any]:
    """What ``ember image inspect`` shows of one image (the keys it always had)."""
    return {
        "id": image.id, "tags": list(image.tags), "manifest_digest": image.manifest_digest,
        "repo_digests": list(image.repo_digests), "pulled_as": image.pulled_as,
        "created": image.created, "size": image.size,
        "layers": [{"digest": x.digest, "media_type": x.media_type, "size": x.size,
                    "diff_id": x.diff_id} for x in image.layer_details],
        "config": {"Entrypoint": image.entrypoint, "Cmd": image.cmd, "Env": list(image.env),
                   "WorkingDir": image.workdir, "User": image.user, "Labels": image.labels,
                   "ExposedPorts": list(image.exposed_ports),
                   "StopSignal": image.stop_signal},
        "rootfs": image.rootfs,
    }


def cmd_image_inspect(args: argparse.Namespace) -> int:
    """A JSON array, as ``docker inspect`` prints, of the images found; errors for the rest."""
    return inspect_each(args.refs, lambda c, name: c.images.get(name), inspect_doc)


def cmd_commit(args: argparse.Namespace) -> int:
    """``ember commit MACHINE [TAG]``: the new image's id (as ``docker commit`` prints it)."""
    with client() as c:
        image = c.machines.get(args.machine).commit(args.tag, comment=args.message or "")
    print(image.id)
    return 0


# ---------------------------------------------------------------- tag / rm / prune


def cmd_image_tag(args: argparse.Namespace) -> int:
    with client() as c:
        c.images.tag(args.source, args.target)
    return 0


def _report(r: ImageRemoval) -> None:
    for tag in r.untagged:
        print(f"Untagged: {tag}")
    for image_id in r.deleted:
        print(f"Deleted: {image_id}")


def cmd_image_rm(args: argparse.Namespace) -> int:
    return each(args.refs, lambda c, ref: _report(c.images.remove(ref, force=args.force)))


def cmd_image_prune(args: argparse.Namespace) -> int:
    from ember.images import human_size

    with client() as c:
        r = c.images.prune(all=args.all)
    _report(r)
    print(f"Total reclaimed space: {human_size(r.space_reclaimed)}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("commit", help="make an image of a running machine's root changes",
                       description="A new image: the machine's image plus what the machine "
                                   "changed in its root (ember diff), read out of the "
                                   "running guest. The machine goes on running.")
    p.add_argument("machine", metavar="MACHINE")
    p.add_argument("tag", metavar="TAG", nargs="?", help="name:tag to give the image")
    p.add_argument("-m", "--message", help="a comment for the image's history")
    p.set_defaults(func=cmd_commit)
    group = sub.add_parser(
        "image", help="manage images (through the daemon)",
        description="Images of the daemon's store. rm untags; an image goes with its last "
                    "tag unless a machine uses it.")
    group.set_defaults(func=help_command(group))
    img = group.add_subparsers(metavar="ACTION")
    i = img.add_parser("import", help="import an OCI layout or a docker-save tarball")
    i.add_argument("path")
    i.add_argument("--tag", "-t", help="name:tag to give the image")
    i.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    i.set_defaults(func=cmd_image_import)
    sm = img.add_parser("sample", help="make the busybox sample image (from this host's "
                        "/bin/busybox); its Cmd is /app/hello.sh")
    sm.add_argument("--tag", "-t", default="sample:latest",
                    help="name:tag to give it (default sample:latest)")
    sm.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    sm.set_defaults(func=cmd_image_sample)
    ls = img.add_parser("ls", help="list images")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("-q", "--quiet", action="store_true", help="only the short ids")
    ls.set_defaults(func=cmd_image_ls)
    ins = img.add_parser("inspect", help="show images' records and configs as a JSON array")
    ins.add_argument("refs", nargs="+", metavar="IMAGE")
    ins.set_defaults(func=cmd_image_inspect)
    tg = img.add_parser("tag", help="give an image another tag (taken from an image that has "
                        "it)")
    tg.add_argument("source", metavar="IMAGE")
    tg.add_argument("target", metavar="TAG")
    tg.set_defaults(func=cmd_image_tag)
    rm = img.add_parser("rm", help="untag images, deleting those that lose their last tag "
                        "and that no machine uses")
    rm.add_argument("-f", "--force", action="store_true",
                    help="remove every tag of an image named by id; an image a machine uses "
                    "loses its tags and stays until unused")
    rm.add_argument("refs", nargs="+", metavar="IMAGE")
    rm.set_defaults(func=cmd_image_rm)
    pr = img.add_parser("prune", help="delete untagged images that no machine uses")
    pr.add_argument("-a", "--all", action="store_true",
                    help="every image no machine uses, tagged or not")
    pr.set_defaults(func=cmd_image_prune)
