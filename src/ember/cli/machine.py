"""Machines under the daemon: create, start, stop, restart, kill, pause, resume, rm, rename,
update, wait.

``create`` is SDK calls (``ember.sdk``); the lifecycle commands take the CLI's lean
path (``cli/wire.py``: the API's JSON, no SDK). Errors raise (both raise the SDK's
:class:`EmberError` s) and ``ember.cli.main`` prints them as one line with exit
status 125. The daemon is started on demand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ember.cli.common import (
    EXIT_EMBER_FAILED,
    client,
    command_args,
    count,
    entrypoint_arg,
    error,
    parse_env,
    parse_memory,
    pipe_safe,
    rootfs_size_arg,
    volume_arg,
)
from ember.errors import EmberError, MachineCrashed

if TYPE_CHECKING:
    from ember.api.models import Machine
    from ember.cli.wire import Wire
    from ember.sdk import Client, MachineHandle
    from ember.vmm.egress import EgressPolicy


def _machine_json(info: Machine) -> str:
    return json.dumps(info.model_dump(mode="json"), indent=2)


# ---------------------------------------------------------------- create


def egress_policy(values: Sequence[str]) -> EgressPolicy | None:
    """The policy of ``--egress`` values (None: none given).

    Raises:
        EmberError: a value without ``allow=``/``deny=``, a malformed rule, or no rules.
    """
    from ember.vmm.egress import parse_flag

    if not values:
        return None
    policy = parse_flag(list(values))
    if policy is None:
        raise EmberError("--egress: no rules given (allow=RULE,... or deny=RULE,...)")
    return policy


def egress_arg(values: Sequence[str]) -> dict[str, list[str]] | None:
    """``--egress`` values as the API's ``egress`` (None: none given); raises as
    :func:`egress_policy`."""
    policy = egress_policy(values)
    return policy.to_json() if policy is not None else None


def create_machine(c: Client, args: argparse.Namespace, *, start: bool) -> MachineHandle:
    from ember.sdk import parse_port

    image = args.image
    snapshot = getattr(args, "from_snapshot", None)
    command = command_args(args)
    check_shape(args)
    egress = egress_arg(args.egress)
    if snapshot is not None:
        # no IMAGE with --from: what argparse took for one is the command's first word
        if image is not None and image != "--":
            command = [image, *command]
        m = c.machines.create(
            snapshot=snapshot, name=args.name,
            cpus=args.cpus if args.cpus != 1 else None,
            memory_mib=args.memory if args.memory != 256 else None,
            env=parse_env(args.env), cmd=command or None,
            entrypoint=entrypoint_arg(args.entrypoint), workdir=args.workdir, user=args.user,
            hostname=args.hostname, ports=[parse_port(p) for p in args.publish],
            network=args.network if args.network != "user" else None, restart=args.restart,
            auto_remove=bool(getattr(args, "rm", False)), start=False, egress=egress,
            volumes=volume_specs(args), shares=share_specs(args))
        return _started(m) if start else m
    if image is None:
        raise EmberError("the following arguments are required: IMAGE (or --from SNAPSHOT)")
    if ("/" in image or image.endswith(".tar")) and os.path.exists(image):
        # a path, as `ember run` takes it: imported into the daemon's store first
        from ember.cli.common import progress
        from ember.cli.image import import_image

        imported = import_image(c, image, None, progress(args))
        image = imported.tags[0] if imported.tags else imported.id
    else:
        for p in args.publish:  # bad options fail before any pull
            parse_port(p)
        entrypoint_arg(args.entrypoint)
        image = _pulled(c, image, args)
    m = c.machines.create(
        image, name=args.name, cpus=args.cpus, memory_mib=args.memory,
        env=parse_env(args.env), cmd=command or None, entrypoint=entrypoint_arg(args.entrypoint),
        workdir=args.workdir, user=args.user, hostname=args.hostname,
        ports=[parse_port(p) for p in args.publish],
        network=args.network, restart=args.restart,
        auto_remove=bool(getattr(args, "rm", False)), start=False, cold=args.cold,
        egress=egress, volumes=volume_specs(args), shares=share_specs(args),
        rootfs_size=args.rootfs_size, tmpfs_root=args.tmpfs_root)
    return _started(m) if start else m


def volume_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The named volumes of the ``-v`` values (parsed by ``volume_arg``) as the create
    body's ``volumes`` takes them."""
    from ember.volumes.store import VolumeRequest

    return [{"name": v.name, "target": v.target, "readonly": v.readonly}
            for v in getattr(args, "volume", None) or [] if isinstance(v, VolumeRequest)]


def share_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The host shares of the ``-v`` values as the create body's ``shares`` takes them:
    the directory resolved here (against this shell's cwd), for a daemon on this host."""
    from ember.volumes.shares import ShareMount

    return [{"source": str(v.source), "target": v.target, "readonly": v.readonly}
            for v in getattr(args, "volume", None) or [] if isinstance(v, ShareMount)]


def _pulled(c: Client, image: str, args: argparse.Namespace) -> str:
    """``--pull``: the image pulled through the daemon when it is missing (or always)."""
    from ember.images.reference import looks_like_reference
    from ember.sdk import NotFound

    policy = getattr(args, "pull", "missing")
    if policy == "never" or not looks_like_reference(image):
        return image
    if policy == "missing":
        try:
            c.images.get(image)
            return image
        except NotFound:
            pass
    from ember.cli.pull import pull_image

    pull_image(c, image, None, bool(getattr(args, "quiet", False)))
    return image


def _started(m: MachineHandle) -> MachineHandle:
    """Start ``m``; if that fails remove it and say why (with the console's tail)."""
    try:
        m.start()
    except EmberError as exc:
        # `run -d` that fails leaves nothing behind (the name is free again), but
        # says what the guest's console said first
        from ember.sdk import Conflict

        tail = _console_tail(m)
        with contextlib.suppress(EmberError):
            m.remove(force=True)
        if tail and not isinstance(exc, Conflict):
            raise MachineCrashed(f"{exc} (machine {m.name} removed)", tail) from None
        raise EmberError(f"{exc} (machine {m.name} removed)") from None
    return m


def _console_tail(m: MachineHandle, lines: int = 20) -> str:
    with contextlib.suppress(EmberError):
        return b"".join(m.logs(source="console", tail=lines)).decode(errors="replace").strip()
    return ""


def check_shape(args: argparse.Namespace) -> None:
    """The vCPUs and memory asked for, checked here as the daemon and `ember run` check them."""
    from ember.host.resources import check_machine_shape

    check_machine_shape(args.cpus, args.memory)


def cmd_create(args: argparse.Namespace) -> int:
    if getattr(args, "rm", False) and args.restart != "no":
        raise EmberError("--rm and --restart exclude each other")
    with client() as c:
        m = create_machine(c, args, start=False)
    print(_machine_json(m.info) if args.json else m.name)
    return 0



# ---------------------------------------------------------------- lifecycle


def each_machine(names: Sequence[str], action: Callable[[Wire, str], Any], *,
                 echo: bool = True) -> int:
    """``action(wire, path)`` for every name (``path``: ``/v1/machines/NAME``), on the
    CLI's lean path, printing each name done (``echo``); errors are reported one line each
    and make the status 125 (a daemon that is not there ends it)."""
    from ember.cli.wire import Wire, quote_name
    from ember.sdk.errors import DaemonUnavailable

    status = 0
    with Wire() as w:
        for name in names:
            try:
                action(w, f"/v1/machines/{quote_name(name)}")
            except DaemonUnavailable:
                raise
            except EmberError as exc:
                error(str(exc))
                status = EXIT_EMBER_FAILED
            else:
                if echo:
                    print(name, flush=True)
    return status


def cmd_start(args: argparse.Namespace) -> int:
    return each_machine(args.names, lambda w, path: w.call("POST", f"{path}/start"))


def cmd_stop(args: argparse.Namespace) -> int:
    return each_machine(args.names, lambda w, path: w.call(
        "POST", f"{path}/stop", params={"timeout": args.time}, timeout=args.time + 60))


def cmd_restart(args: argparse.Namespace) -> int:
    return each_machine(args.names, lambda w, path: w.call(
        "POST", f"{path}/restart", params={"timeout": args.time}, timeout=args.time + 360))


def cmd_kill(args: argparse.Namespace) -> int:
    return each_machine(args.names, lambda w, path: w.call(
        "POST", f"{path}/kill", params={"signal": str(args.signal)}))


def cmd_pause(args: argparse.Namespace) -> int:
    return each_machine(args.names, lambda w, path: w.call("POST", f"{path}/pause"))


def cmd_resume(args: argparse.Namespace) -> int:
    return each_machine(args.names, lambda w, path: w.call("POST", f"{path}/resume"))


def cmd_rm(args: argparse.Namespace) -> int:
    return each_machine(args.names, lambda w, path: w.call(
        "DELETE", path, params={"force": args.force}))


def cmd_rename(args: argparse.Namespace) -> int:
    from ember.cli.wire import Wire, quote_name

    with Wire() as w:
        w.call("POST", f"/v1/machines/{quote_name(args.name)}/rename", {"name": args.new_name})
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    """``ember update NAME --egress SPEC... | --egress-clear``: ``PATCH`` the machine."""
    from ember.cli.wire import Wire, quote_name

    if args.egress and args.egress_clear:
        raise EmberError("--egress and --egress-clear exclude each other")
    if not args.egress and not args.egress_clear:
        raise EmberError("nothing to update: give --egress SPEC or --egress-clear")
    body = {"egress": None if args.egress_clear else egress_arg(args.egress)}
    with Wire() as w:
        info = w.call("PATCH", f"/v1/machines/{quote_name(args.name)}", body)
    print(json.dumps(info, indent=2) if args.json else args.name)
    return 0


#: What ``ember wait`` prints for a machine that ended without an exit code of its
#: main process (its QEMU crashed, it had no main process, it never ran).
NO_EXIT_CODE = {"crashed": 255, "stopped": 0, "created": 0}


def cmd_wait(args: argparse.Namespace) -> int:
    """Block until each machine stops; print its exit code (as ``docker wait``)."""
    def wait(w: Wire, path: str) -> None:
        result = w.call("POST", f"{path}/wait", timeout=None)
        code = result.get("exit_code")
        print(code if code is not None else NO_EXIT_CODE.get(result.get("state", ""), 255),
              flush=True)
    return each_machine(args.names, wait, echo=False)


def register(sub: Any) -> None:
    c = sub.add_parser("create", help="create a machine under the daemon (not started)",
                       description="Create a machine from IMAGE under the daemon and print its "
                       "name; `ember start NAME` boots it.")
    add_create_options(c)
    c.add_argument("--json", action="store_true", help="print the machine's record as JSON")
    c.add_argument("--from", dest="from_snapshot", metavar="SNAPSHOT",
                   help="a clone of this snapshot (id, prefix or tag) instead of IMAGE")
    c.add_argument("image", metavar="IMAGE", nargs="?")
    c.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    c.set_defaults(func=pipe_safe(cmd_create))

    for name, func, text in (("start", cmd_start, "boot machines (a running one is left be)"),
                             ("pause", cmd_pause, "freeze machines' vCPUs"),
                             ("resume", cmd_resume, "unfreeze paused machines")):
        p = sub.add_parser(name, help=text)
        p.add_argument("names", nargs="+", metavar="NAME")
        p.set_defaults(func=pipe_safe(func))
    for name, func, text in (
            ("stop", cmd_stop, "stop machines: SIGTERM, then power off after a timeout"),
            ("restart", cmd_restart, "stop machines (as stop) and start them again")):
        p = sub.add_parser(name, help=text)
        p.add_argument("-t", "--time", type=float, default=10.0, metavar="SECONDS",
                       help="seconds to wait after SIGTERM before powering off (default 10)")
        p.add_argument("names", nargs="+", metavar="NAME")
        p.set_defaults(func=pipe_safe(func))
    p = sub.add_parser("kill", help="power machines off at once, or signal their main process",
                       description="SIGKILL (the default) powers the machine off at once "
                       "(exit code 137); another signal goes to the main process.")
    p.add_argument("-s", "--signal", type=signal_arg, default="SIGKILL", metavar="SIGNAL",
                   help="signal name or number (default SIGKILL)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=pipe_safe(cmd_kill))
    p = sub.add_parser("rm", help="remove machines")
    p.add_argument("-f", "--force", action="store_true", help="remove running machines too")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=pipe_safe(cmd_rm))
    p = sub.add_parser("rename", help="rename a machine (its hostname stays)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("new_name", metavar="NEW_NAME")
    p.set_defaults(func=pipe_safe(cmd_rename))
    p = sub.add_parser("update", help="change a machine's egress policy (at once if it runs)",
                       description="Set (or, with --egress-clear, remove) the egress policy of "
                       "machine NAME: kept for its next starts and applied at once if it runs "
                       "(new connections; open ones stay). Needs the tap network (a root "
                       "daemon).")
    p.add_argument("--egress", action="append", default=[], metavar="SPEC",
                   help=EGRESS_HELP + "; replaces the whole policy")
    p.add_argument("--egress-clear", action="store_true",
                   help="remove the policy: public addresses only")
    p.add_argument("--json", action="store_true", help="print the machine's record as JSON")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=pipe_safe(cmd_update))
    p = sub.add_parser("wait", help="wait for machines to stop; print their exit codes",
                       description="Block until each machine is no longer running and print "
                       "its main process's exit code (255 after a crash, 0 for a machine "
                       "without a main process).")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=pipe_safe(cmd_wait))


def signal_arg(value: str) -> str:
    from ember.util import parse_signal

    try:
        parse_signal(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


#: The help of ``--egress`` (``vmm/egress.py`` has the rules).
EGRESS_HELP = ("where the guest may connect, repeatable: allow=RULE,... (only those) or "
               "deny=RULE,...; RULE is CIDR, ADDRESS or DOMAIN (*.DOMAIN), optionally :PORT")


def add_create_options(p: argparse.ArgumentParser) -> None:
    """The options of a machine, shared by `create` and `run` (with or without -d)."""
    p.add_argument("--name", help="machine name (default: generated)")
    p.add_argument("--cpus", type=count, default=1, help="vCPUs (default 1)")
    p.add_argument("-m", "--memory", type=parse_memory, default=256, metavar="MIB",
                   help="guest memory in MiB, or 512m / 2g (default 256)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K[=V]",
                   help="set an environment variable; K alone passes this shell's value")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the guest")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]", help="user to run as")
    p.add_argument("--entrypoint", help="override the image's entrypoint ('' clears it)")
    p.add_argument("--hostname", help="guest hostname")
    p.add_argument("-p", "--publish", action="append", default=[],
                   metavar="[IP:]HOST:GUEST",
                   help="publish a guest TCP port on the host (GUEST alone: any free port)")
    p.add_argument("--network", choices=("user", "none"), default="user",
                   help="user: NAT with outbound access (default); none: no network")
    p.add_argument("--egress", action="append", default=[], metavar="SPEC",
                   help=EGRESS_HELP + " (needs the tap network: root)")
    p.add_argument("-v", "--volume", action="append", default=[], type=volume_arg,
                   metavar="NAME|HOSTDIR:/PATH[:ro]",
                   help="-v NAME:/PATH[:ro] mounts a named volume (ember volume create) at "
                   "PATH in the guest; -v HOSTDIR:/PATH[:ro] shares a host directory (a path "
                   "with a '/', or starting with '.' or '~') live; :ro read-only; repeatable")
    p.add_argument("--restart", choices=("no", "on-failure", "always"), default="no",
                   help="restart policy (default no; a daemon machine's)")
    p.add_argument("--cold", action="store_true",
                   help="boot, even where a boot snapshot of this machine shape would give a "
                   "warm start")
    p.add_argument("--rootfs-size", type=rootfs_size_arg, default=None, metavar="SIZE",
                   help="the machine's writable root layer on disk, e.g. 4G (sparse; default "
                   "10G for a daemon machine, which keeps its changes until rm; a foreground "
                   "run's layer is guest memory unless this is given)")
    p.add_argument("--tmpfs-root", action="store_true",
                   help="keep the writable root layer in guest memory (gone at every stop)")
    p.add_argument("--pull", choices=("missing", "always", "never"), default="missing",
                   help="pull the image from its registry: when it is not in the store "
                   "(default), always, or never")
    p.add_argument("--rm", action="store_true",
                   help="remove the machine when it stops (a foreground run always is)")
