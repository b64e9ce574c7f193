"""``ember pull``, ``ember login`` and ``ember logout``: images from registries.

``pull`` goes through the daemon (``POST /v1/images/pull``), like every image
command, with a progress bar per layer on a terminal and one line per layer
step otherwise. ``login`` and ``logout`` edit Ember's own ``auth.json`` (the
containers format, mode 0600) in the data directory; pulls also read docker's
and podman's credential files (``images/registry/config.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

from ember.cli.common import client, progress
from ember.errors import EmberError

if TYPE_CHECKING:
    from ember.api.models import ImageImported, PullEvent
    from ember.sdk import Client


def pull_image(c: Client, ref: str, platform: str | None, quiet: bool,
               ca_cert: str | None = None) -> ImageImported:
    """Pull ``ref`` through the daemon, showing progress on stderr unless ``quiet``."""
    if quiet:
        return c.images.pull(ref, platform=platform, ca_cert=ca_cert)
    if sys.stderr.isatty():
        return _pull_with_bars(c, ref, platform, ca_cert)
    return _pull_with_lines(c, ref, platform, ca_cert)


def _short(digest: str | None) -> str:
    return (digest or "").split(":", 1)[-1][:12]


def _pull_with_lines(c: Client, ref: str, platform: str | None,
                     ca_cert: str | None) -> ImageImported:
    from ember.images import human_size

    started = time.monotonic()
    fetched = {"bytes": 0}

    def show(ev: PullEvent) -> None:
        if ev.status == "resolved":
            print(f"ember: pulling {ev.reference} ({ev.layers} layers, "
                  f"{human_size(ev.size or 0)}) from {ev.source}", file=sys.stderr)
        elif ev.status == "message" and ev.message:
            print(f"ember: {ev.message}", file=sys.stderr)
        elif ev.status == "layer" and ev.state in ("exists", "downloaded"):
            if ev.state == "downloaded":
                fetched["bytes"] += ev.total or 0
            what = "already in the store" if ev.state == "exists" else \
                f"downloaded {human_size(ev.total or 0)}"
            print(f"ember: layer {_short(ev.id)}: {what}", file=sys.stderr)

    image = c.images.pull(ref, platform=platform, progress=show, ca_cert=ca_cert)
    took = time.monotonic() - started
    print(f"ember: pulled {image.short_id} ({human_size(fetched['bytes'])} downloaded in "
          f"{took:.1f} s)" + (f" as {', '.join(image.tags)}" if image.tags else ""),
          file=sys.stderr)
    return image


def _pull_with_bars(c: Client, ref: str, platform: str | None,
                    ca_cert: str | None) -> ImageImported:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                    transient=False)
    tasks: dict[str, TaskID] = {}
    overall: list[TaskID] = []

    def show(ev: PullEvent) -> None:
        if ev.status == "resolved":
            console.print(f"pulling {ev.reference} from {ev.source}")
            overall.append(bars.add_task("total", total=ev.size or 0))
        elif ev.status == "message" and ev.message:
            console.print(ev.message)
        elif ev.status == "layer" and ev.id is not None:
            if ev.id not in tasks:
                tasks[ev.id] = bars.add_task(_short(ev.id), total=ev.total or 0)
            task = tasks[ev.id]
            before = bars.tasks[task].completed if task in bars.task_ids else 0
            current = ev.current or 0
            label = {"exists": "exists", "unpacked": "unpacked"}.get(ev.state or "", "")
            bars.update(task, completed=current,
                        description=f"{_short(ev.id)} {label}".rstrip())
            if overall:
                bars.advance(overall[0], max(0, current - int(before)))

    with bars:
        image = c.images.pull(ref, platform=platform, progress=show, ca_cert=ca_cert)
    console.print(f"pulled {image.short_id}" + (f" as {', '.join(image.tags)}"
                                               if image.tags else ""))
    return image


def cmd_pull(args: argparse.Namespace) -> int:
    with client() as c:
        image = pull_image(c, args.reference, args.platform, args.quiet, args.ca_cert)
    print(image.id)
    return 0


def _registry(value: str) -> str:
    """``https://host:5000/`` -> ``host:5000``; Docker Hub's aliases -> ``docker.io``."""
    host = value.strip().removeprefix("https://").removeprefix("http://").split("/", 1)[0]
    host = host.lower()
    if not host:
        raise EmberError(f"invalid registry {value!r}")
    return "docker.io" if host in ("index.docker.io", "registry-1.docker.io") else host


def cmd_login(args: argparse.Namespace) -> int:
    from ember.images.registry.config import login

    domain = _registry(args.registry)
    username = args.username
    if username is None:
        if not sys.stdin.isatty():
            raise EmberError("give the user name with -u (stdin is not a terminal)")
        username = input("Username: ").strip()
    if args.password_stdin:
        password = sys.stdin.read().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise EmberError("give the password with --password-stdin (stdin is not a "
                             "terminal)")
        import getpass

        password = getpass.getpass("Password: ")
    if not username or not password:
        raise EmberError("a user name and a password are needed")
    path = login(domain, username, password)
    progress(args)(f"credentials for {domain} stored in {path}")
    print("Login Succeeded")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from ember.images.registry.config import logout

    domain = _registry(args.registry)
    if not logout(domain):
        raise EmberError(f"not logged in to {domain}")
    print(f"Removed login credentials for {domain}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("pull", help="pull an image from a registry",
                       description="Pull an image (e.g. alpine, user/app:1, "
                       "host:5000/a/b@sha256:...) from its registry into the store. "
                       "Credentials: ember login, docker's config.json, podman's auth.json.")
    p.add_argument("reference", metavar="REF")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="the platform to pull from a multi-platform image (default: "
                   "the host's, linux/amd64)")
    p.add_argument("--ca-cert", metavar="PEM",
                   help="a CA certificate to trust for this registry, besides "
                   "/etc/containers/certs.d/HOST:PORT/*.crt")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the image id")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("login", help="store credentials for a registry",
                       description="Store a user name and password for REGISTRY in Ember's "
                       "auth.json (mode 0600), used by pulls.")
    p.add_argument("registry", metavar="REGISTRY")
    p.add_argument("-u", "--username")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from stdin")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_login)

    p = sub.add_parser("logout", help="remove the stored credentials for a registry")
    p.add_argument("registry", metavar="REGISTRY")
    p.set_defaults(func=cmd_logout)
