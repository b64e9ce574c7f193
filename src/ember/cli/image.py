"""``ember image``: import, list, inspect and remove images of the local store."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ember.cli.common import error, help_command, progress
from ember.errors import EmberError


def cmd_image_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ember import paths
    from ember.images import ImageStore

    image = ImageStore(paths.images_dir()).import_path(
        Path(args.path), tag=args.tag, progress=progress(args))
    print(image.id)
    return 0


def cmd_image_ls(args: argparse.Namespace) -> int:
    from ember import paths
    from ember.images import ImageStore, human_size

    images = ImageStore(paths.images_dir()).list()
    if args.json:
        print(json.dumps([
            {"id": i.id, "tags": list(i.tags), "size": i.size, "created": i.created}
            for i in images
        ], indent=2))
        return 0
    rows = [("ID", "TAGS", "SIZE", "CREATED")]
    for i in images:
        tags = ", ".join(i.tags) or "<none>"
        rows.append((i.short_id, tags, human_size(i.size), i.created or ""))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_image_inspect(args: argparse.Namespace) -> int:
    from ember import paths
    from ember.images import ImageStore

    store = ImageStore(paths.images_dir())
    image = store.resolve(args.ref)
    c = image.config
    print(json.dumps({
        "id": image.id, "tags": list(image.tags), "manifest_digest": image.manifest_digest,
        "created": image.created, "size": image.size,
        "layers": [{"digest": x.digest, "media_type": x.media_type, "size": x.size,
                    "diff_id": x.diff_id} for x in image.layers],
        "config": {"Entrypoint": c.entrypoint, "Cmd": c.cmd, "Env": list(c.env),
                   "WorkingDir": c.working_dir, "User": c.user, "Labels": c.labels_dict,
                   "ExposedPorts": list(c.exposed_ports), "StopSignal": c.stop_signal},
        "rootfs": str(store.rootfs_path(image)),
    }, indent=2))
    return 0


def cmd_image_rm(args: argparse.Namespace) -> int:
    from ember import paths
    from ember.images import ImageStore

    store = ImageStore(paths.images_dir())
    status = 0
    for ref in args.refs:
        try:
            image = store.remove(ref)
            print(f"removed {image.id}")
        except EmberError as exc:
            error(str(exc))
            status = 1
    return status


def register(sub: Any) -> None:
    group = sub.add_parser("image", help="manage images")
    group.set_defaults(func=help_command(group))
    img = group.add_subparsers(metavar="ACTION")
    i = img.add_parser("import", help="import an OCI layout or a docker-save tarball")
    i.add_argument("path")
    i.add_argument("--tag", "-t", help="name:tag to give the image")
    i.add_argument("-q", "--quiet", action="store_true")
    i.set_defaults(func=cmd_image_import)
    ls = img.add_parser("ls", help="list images")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_image_ls)
    ins = img.add_parser("inspect", help="show an image's record and config as JSON")
    ins.add_argument("ref", metavar="IMAGE")
    ins.set_defaults(func=cmd_image_inspect)
    rm = img.add_parser("rm", help="remove images")
    rm.add_argument("refs", nargs="+", metavar="IMAGE")
    rm.set_defaults(func=cmd_image_rm)
