"""What the sync and async clients share: where the daemon is, request bodies, parsing.

Nothing here does I/O, so :mod:`ember.sdk.client` and :mod:`ember.sdk.aio`
differ only in how they send a request and wait for its answer.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import os
import posixpath
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError

from ember.api import models
from ember.errors import EmberError
from ember.sdk.endpoint import (
    CONNECT_TIMEOUT,
    UNIX_BASE_URL,
    Endpoint,
    default_socket,
    quote_name,
    resolve_endpoint,
    unreachable,
)
from ember.sdk.errors import InvalidRequest, api_error, error_for
from ember.sdk.execevent import ExecEvent

__all__ = ["CONNECT_TIMEOUT", "UNIX_BASE_URL", "Endpoint", "ExecEvent", "api_error",
           "default_socket", "quote_name",
           "resolve_endpoint", "unreachable"]

#: Seconds for a plain request (start waits for a boot; a busy TCG host boots slowly).
DEFAULT_TIMEOUT = 300.0

PortLike = models.PortSpec | Mapping[str, Any] | str | int
#: An egress policy: ``{"allow": [RULE, ...], "deny": [RULE, ...]}`` (either may be left
#: out), or the API's model.
EgressLike = models.Egress | Mapping[str, Sequence[str]]
#: A volume for a machine: ``{"name": "data", "target": "/data", "readonly": False}``
#: (``readonly`` may be left out), ``"data:/data[:ro]"``, or the API's model. In
#: ``volumes=``, a host share (:data:`ShareLike`) is taken too, as ``-v`` takes it.
VolumeLike = models.VolumeSpec | models.ShareSpec | Mapping[str, Any] | str
#: A host share for a machine: ``{"source": "/srv/app", "target": "/app", "readonly":
#: False}`` (``readonly`` may be left out), ``"/srv/app:/app[:ro]"``, or the API's model.
#: The directory is the daemon host's.
ShareLike = models.ShareSpec | Mapping[str, Any] | str


class Keep:
    """The default of an update's fields: the machine keeps what it has."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP = Keep()


# ------------------------------------------------------------ errors


def pull_body(reference: str, platform: str | None,
              ca_cert: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    return ({"reference": reference} | ({"platform": platform} if platform else {})
            | ({"ca_cert": os.path.abspath(ca_cert)} if ca_cert is not None else {}))


def pull_line(line: str, progress: Callable[[models.PullEvent], None] | None
              ) -> models.ImageImported | None:
    """One line of a pull's stream: progress is passed on; the image once ``done``; an
    ``error`` line raises as the status it carries would have."""
    if not line.strip():
        return None
    ev = models.PullEvent.model_validate_json(line)
    if ev.status == "error":
        raise error_for(ev.code or 424, "pull_failed", ev.message or "the pull failed")
    if ev.status == "done":
        if ev.image is None:
            raise error_for(502, "bad_stream", "the daemon ended the pull without the image")
        return ev.image
    if progress is not None:
        progress(ev)
    return None


def invalid(message: str) -> InvalidRequest:
    """A request refused before it was sent, as the daemon would have refused it."""
    return InvalidRequest(422, "invalid", message)


def validation_message(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        msg = "unknown field" if e.get("type") == "extra_forbidden" else str(e.get("msg"))
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


# ------------------------------------------------------------ request bodies


def quote_ref(ref: str) -> str:
    """An image reference in a URL path: ``:`` and ``/`` stay (the route takes a path)."""
    if not ref:
        raise invalid("an image reference must not be empty")
    return quote(ref, safe="/:@")


def image_tag_body(tag: str) -> dict[str, Any]:
    """The JSON body of ``POST /v1/images/{ref}/tag``, checked before sending."""
    try:
        return models.ImageTag(tag=tag).model_dump()
    except ValidationError as exc:
        raise invalid(validation_message(exc)) from None


def parse_port(text: str) -> models.PortSpec:
    """``-p`` syntax: ``HOST:GUEST``, ``IP:HOST:GUEST`` or ``GUEST`` (optionally ``/tcp``).

    A missing or ``0`` host port lets the daemon pick a free one.

    Raises:
        InvalidRequest: malformed text, a port out of range, an address that is not IPv4,
            or a protocol other than tcp.
    """
    spec = text.strip()
    usage = "use HOST:GUEST, IP:HOST:GUEST or GUEST"
    if not spec:
        raise invalid(f"empty port mapping: {usage}")
    if "/" in spec:
        spec, proto = spec.rsplit("/", 1)
        if proto.lower() != "tcp":
            raise invalid(f"invalid port mapping {text!r}: only tcp ports can be published")
    parts = spec.split(":")
    if len(parts) > 3:
        raise invalid(f"invalid port mapping {text!r}: {usage}")
    guest = parts[-1]
    host = parts[-2] if len(parts) >= 2 else ""
    host_ip = (parts[0] if len(parts) == 3 else "") or "127.0.0.1"

    def port(value: str, what: str, lo: int) -> int:
        if not value.isascii() or not value.isdigit() or not lo <= int(value) <= 65535:
            raise invalid(f"invalid port mapping {text!r}: {what} port {value!r} is not a "
                          f"number from {lo} to 65535")
        return int(value)

    try:
        ipaddress.IPv4Address(host_ip)
    except ValueError:
        raise invalid(f"invalid port mapping {text!r}: {host_ip!r} is not an IPv4 "
                      "address") from None
    return models.PortSpec(guest_port=port(guest, "guest", 1),
                           host_port=port(host, "host", 0) if host else 0, host_ip=host_ip)


def port_spec(value: PortLike) -> models.PortSpec:
    if isinstance(value, models.PortSpec):
        return value
    if isinstance(value, bool):
        raise invalid(f"invalid port {value!r}")
    if isinstance(value, int):
        return parse_port(str(value))
    if isinstance(value, str):
        return parse_port(value)
    try:
        return models.PortSpec.model_validate(dict(value))
    except ValidationError as exc:
        raise invalid(f"ports: {validation_message(exc)}") from None


def egress_body(value: EgressLike | None) -> models.Egress | None:
    """An ``egress`` as the API takes it, checked as the daemon checks it (rules
    normalised); None for None or a policy without rules.

    Raises:
        InvalidRequest: not a mapping of ``allow``/``deny`` lists, or a malformed rule
            (the daemon's message, naming it).
    """
    from ember.vmm.egress import EgressPolicy

    if value is None:
        return None
    if isinstance(value, models.Egress):
        data: dict[str, Any] = value.model_dump()
    elif isinstance(value, Mapping):
        data = {}
        for key, rules in value.items():
            if isinstance(rules, str | bytes):
                raise invalid(f"egress.{key} must be a list of rules, e.g. [\"1.1.1.1:53\"]")
            data[key] = list(rules)
    else:
        raise invalid('egress must be {"allow": [RULE, ...], "deny": [RULE, ...]}')
    try:
        models.Egress.model_validate(data)
        policy = EgressPolicy.from_json(data)
    except ValidationError as exc:
        raise invalid(f"egress: {validation_message(exc)}") from None
    except EmberError as exc:
        raise invalid(str(exc)) from None
    return models.Egress.model_validate(policy.to_json()) if policy is not None else None


def _split_mount(text: str, what: str) -> tuple[str, str, bool]:
    """``SOURCE:/PATH[:ro|:rw]`` as its parts, as ``-v`` reads them."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise invalid(f"{what} {text!r}: use NAME:/PATH or HOSTDIR:/PATH, then :ro if wanted")
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise invalid(f"{what} {text!r}: the mode must be ro or rw, not {mode!r}")
    return parts[0], parts[1], mode == "ro"


def volume_spec(value: VolumeLike) -> models.VolumeSpec | models.ShareSpec:
    """A ``volumes=`` entry of a create as the API takes it, checked as the daemon checks
    it: a named volume, or a host share (a string whose first part is a path, as ``-v``
    reads it, a mapping with a ``source``, a ShareSpec)."""
    from ember.volumes.shares import is_host_path
    from ember.volumes.store import VolumeError, VolumeRequest, validated

    if isinstance(value, models.ShareSpec):
        return share_spec(value)
    try:
        if isinstance(value, models.VolumeSpec):
            spec = value
        elif isinstance(value, str):
            name, target, readonly = _split_mount(value, "volume")
            if is_host_path(name):
                return share_spec(value)
            spec = models.VolumeSpec(name=name, target=target, readonly=readonly)
        elif isinstance(value, Mapping):
            if "source" in value and "name" not in value:
                return share_spec(value)
            spec = models.VolumeSpec.model_validate(dict(value))
        else:
            raise invalid('a volume is {"name": ..., "target": "/path", "readonly": false} '
                          'or "NAME:/PATH[:ro]"')
        req = validated(VolumeRequest(spec.name, spec.target, spec.readonly))
    except ValidationError as exc:
        raise invalid(f"volumes: {validation_message(exc)}") from None
    except VolumeError as exc:
        raise invalid(str(exc)) from None
    return models.VolumeSpec(name=req.name, target=req.target, readonly=req.readonly)


def share_spec(value: ShareLike) -> models.ShareSpec:
    """A host share of a create as the API takes it. Only its shape is checked here (the
    directory is the daemon host's, which checks it): an absolute source (a string's is
    made so against this process's cwd, ``~`` expanded, as ``-v`` does) and a mount path."""
    from ember.volumes.shares import is_host_path
    from ember.volumes.store import VolumeError, check_target

    try:
        if isinstance(value, models.ShareSpec):
            spec = value
        elif isinstance(value, str):
            source, target, readonly = _split_mount(value, "share")
            if not is_host_path(source):
                raise invalid(f"share {value!r}: {source!r} is a volume's name, not a host "
                              "directory (give a path: /dir, ./dir or ~/dir; volumes go in "
                              "volumes=)")
            source = os.path.abspath(os.path.expanduser(source))
            spec = models.ShareSpec(source=source, target=target, readonly=readonly)
        elif isinstance(value, Mapping):
            spec = models.ShareSpec.model_validate(dict(value))
        else:
            raise invalid('a share is {"source": "/host/dir", "target": "/path", "readonly": '
                          'false} or "HOSTDIR:/PATH[:ro]"')
        target = check_target(spec.target)
    except ValidationError as exc:
        raise invalid(f"shares: {validation_message(exc)}") from None
    except VolumeError as exc:
        raise invalid(str(exc)) from None
    return models.ShareSpec(source=posixpath.normpath(spec.source), target=target,
                            readonly=spec.readonly)


def mount_specs(volumes: Sequence[VolumeLike] | None, shares: Sequence[ShareLike] | None
                ) -> tuple[list[models.VolumeSpec], list[models.ShareSpec]]:
    """A create's ``volumes=`` and ``shares=`` as the body's ``volumes`` and ``shares``
    (host shares given in ``volumes=`` move to ``shares``), their mount paths checked
    together as the daemon checks them."""
    from pathlib import Path

    from ember.volumes.shares import ShareMount
    from ember.volumes.store import VolumeError, VolumeMount, check_mounts

    vols: list[models.VolumeSpec] = []
    shrs: list[models.ShareSpec] = []
    for what, values, example in (
            ("volumes", volumes, '[{"name": "data", "target": "/data"}]'),
            ("shares", shares, '[{"source": "/srv/app", "target": "/app"}]')):
        if values and isinstance(values, str | bytes | Mapping):
            raise invalid(f"{what} must be a list, e.g. {example}")
    for v in volumes or ():
        spec = volume_spec(v)
        if isinstance(spec, models.ShareSpec):
            shrs.append(spec)
        else:
            vols.append(spec)
    shrs.extend(share_spec(s) for s in shares or ())
    try:
        check_mounts(tuple(VolumeMount(v.name, Path("/"), v.target, v.readonly) for v in vols),
                     tuple(ShareMount(Path(s.source), s.target, s.readonly) for s in shrs))
    except VolumeError as exc:
        raise invalid(str(exc)) from None
    return vols, shrs


def volume_create_body(name: str, size_bytes: int | None) -> dict[str, Any]:
    try:
        body = models.VolumeCreate(name=name, size_bytes=size_bytes)
    except ValidationError as exc:
        raise invalid(validation_message(exc)) from None
    return body.model_dump(mode="json", exclude_none=True)


def machine_update_body(*, egress: EgressLike | None | Keep = KEEP) -> dict[str, Any]:
    """The JSON body of ``PATCH /v1/machines/{name}``: only the fields given."""
    body: dict[str, Any] = {}
    if not isinstance(egress, Keep):
        policy = egress_body(egress)
        body["egress"] = policy.model_dump() if policy is not None else None
    return body


def _argv(value: Sequence[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str | bytes):
        raise invalid(f"{what} must be a list of strings, e.g. [\"sh\", \"-c\", \"...\"]")
    return [str(a) for a in value]


def machine_create_body(image: str | None, *, name: str | None, cpus: int | None,
                        memory_mib: int | None, env: Mapping[str, str] | None,
                        cmd: Sequence[str] | None, entrypoint: Sequence[str] | None,
                        workdir: str | None, user: str | None, hostname: str | None,
                        ports: Sequence[PortLike] | None, network: str | None,
                        restart: str, auto_remove: bool = False,
                        snapshot: str | None = None, cold: bool = False,
                        egress: EgressLike | None = None,
                        volumes: Sequence[VolumeLike] | None = None,
                        shares: Sequence[ShareLike] | None = None,
                        rootfs_size: int | None = None,
                        tmpfs_root: bool = False) -> dict[str, Any]:
    """The JSON body of ``POST /v1/machines``, checked against the contract before sending.

    Only what is given is sent (``None``: the daemon's default, or a snapshot's own).
    """
    given: dict[str, Any] = {"image": image, "snapshot": snapshot, "name": name, "cpus": cpus,
                             "memory_mib": memory_mib, "workdir": workdir, "user": user,
                             "hostname": hostname}
    try:
        kwargs = {k: v for k, v in given.items() if v is not None}
        if env:
            kwargs["env"] = dict(env)
        if cmd is not None:
            kwargs["cmd"] = _argv(cmd, "cmd")
        if entrypoint is not None:
            kwargs["entrypoint"] = _argv(entrypoint, "entrypoint")
        if ports:
            kwargs["ports"] = [port_spec(p) for p in ports]
        if network is not None:
            kwargs["network"] = models.NetworkMode(network)
        kwargs["restart"] = models.RestartPolicy(restart)
        kwargs["auto_remove"] = auto_remove
        if cold:
            kwargs["cold"] = True
        if rootfs_size is not None:
            kwargs["rootfs_size"] = rootfs_size
        if tmpfs_root:
            kwargs["tmpfs_root"] = True
        policy = egress_body(egress)
        if policy is not None:
            kwargs["egress"] = policy
        vols, shrs = mount_specs(volumes, shares)
        if vols:
            kwargs["volumes"] = vols
        if shrs:
            kwargs["shares"] = shrs
        body = models.MachineCreate(**kwargs)
    except ValidationError as exc:
        raise invalid(validation_message(exc)) from None
    except ValueError as exc:  # an enum value
        raise invalid(str(exc)) from None
    return body.model_dump(mode="json", exclude_unset=True)


def exec_body(cmd: Sequence[str], *, env: Mapping[str, str] | None, workdir: str | None,
              user: str | None, tty: bool, stdin: bytes | str | None,
              timeout: float | None) -> dict[str, Any]:
    """The JSON body of the exec endpoints (``ExecCreate``)."""
    if isinstance(stdin, bytes | bytearray):
        try:
            stdin = bytes(stdin).decode()
        except UnicodeDecodeError:
            raise invalid("stdin must be UTF-8 text for exec (use exec_session for "
                          "binary input)") from None
    try:
        body = models.ExecCreate(cmd=_argv(cmd, "cmd") or [], env=dict(env or {}),
                                 workdir=workdir, user=user, tty=tty, stdin=stdin,
                                 timeout=timeout)
    except ValidationError as exc:
        raise invalid(validation_message(exc)) from None
    return body.model_dump(mode="json", exclude_none=True)


def logs_params(source: str, follow: bool, tail: int, since: float | datetime | None,
                timestamps: bool) -> dict[str, Any]:
    """The query of ``GET /logs``; ``since`` is Unix seconds or an aware datetime."""
    params: dict[str, Any] = {"source": source, "follow": follow, "tail": tail}
    if since is not None:
        params["since"] = since.timestamp() if isinstance(since, datetime) else float(since)
    if timestamps:
        params["timestamps"] = True
    return params


def signal_param(sig: int | str) -> str:
    """A signal for ``POST /kill``: a number or a name, as the API takes them."""
    import signal as signals

    return sig.name if isinstance(sig, signals.Signals) else str(sig)


def request_timeout(default: float | None, exec_timeout: float | None) -> float | None:
    """An exec may run as long as it was allowed to, plus time to report."""
    if default is None:
        return None
    if exec_timeout is None:
        return None
    return max(default, exec_timeout + 30.0)


# ------------------------------------------------------------ responses


def decode_exec_event(line: bytes | str) -> ExecEvent:
    try:
        ev = models.ExecEvent.model_validate_json(line)
    except ValidationError as exc:
        raise EmberError(f"the daemon sent a malformed exec event: "
                         f"{validation_message(exc)}") from None
    return ExecEvent(type=ev.type, data=base64.b64decode(ev.data) if ev.data else b"",
                     pid=ev.pid, exit_code=ev.exit_code, signal=ev.signal,
                     timed_out=bool(ev.timed_out), message=ev.message,
                     truncated=bool(ev.truncated))


def parse_list(model: type[models.Image] | type[models.Machine] | type[models.Snapshot]
               | type[models.Volume] | type[models.Change],
               data: bytes) -> list[Any]:
    return [model.model_validate(x) for x in json.loads(data)]


# ------------------------------------------------------------ files


def single_file_tar(name: str, data: bytes, mode: int) -> bytes:
    """A tar holding one regular file ``name``, owned by root (as ``docker cp`` makes it)."""
    buf = io.BytesIO()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode & 0o7777
    info.mtime = int(time.time())
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def split_guest_path(path: str) -> tuple[str, str]:
    """``/a/b/c`` -> (``/a/b``, ``c``); the guest path must name a file, not ``/``."""
    norm = posixpath.normpath("/" + path.lstrip("/")) if path else ""
    parent, name = posixpath.split(norm)
    if not name:
        raise invalid(f"{path!r} does not name a file")
    return parent, name


def guest_abs(path: str) -> str:
    """Guest paths are absolute, or relative to ``/`` (as with ``docker cp``)."""
    if not path:
        raise invalid("the guest path must not be empty")
    return path if path.startswith("/") else "/" + path


def file_from_tar(tar_bytes: bytes, path: str) -> bytes:
    """The one regular file in an archive from ``GET /files``."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tf:
        first = tf.next()
        if first is None:
            raise EmberError(f"{path}: the daemon sent an empty archive")
        if first.isdir():
            raise EmberError(f"{path} is a directory: use get_archive")
        if first.issym():
            raise EmberError(f"{path} is a symlink to {first.linkname}")
        f = tf.extractfile(first)
        if f is None:
            raise EmberError(f"{path} is not a regular file")
        return f.read()


class MachineRecord:
    """What the sync and async machine handles share: the last record seen, ``info``."""

    info: models.Machine

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def state(self) -> models.MachineState:
        return self.info.state

    @property
    def ports(self) -> list[models.Port]:
        return self.info.ports

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ({self.info.state.value})>"
