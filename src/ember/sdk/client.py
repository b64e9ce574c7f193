"""The synchronous client: :class:`Client`, its ``images`` and ``machines``, :class:`MachineHandle`.

Every method is one REST call (docs/api.md); results are the API's pydantic
models (``ember.api.models``), errors are :mod:`ember.sdk.errors`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any, TypeVar

from ember._httpx import httpx
from ember.api import models
from ember.sdk import _common as c
from ember.sdk._common import EgressLike, ExecEvent, PortLike, ShareLike, VolumeLike
from ember.sdk.errors import DaemonUnavailable, NotFound, error_for

if TYPE_CHECKING:
    import asyncio
    import ssl

T = TypeVar("T")
_UPLOAD_CHUNK = 1 << 20
#: The largest stdin message :meth:`ExecSession.send` sends (the daemon takes up to 16 MiB).
STDIN_MESSAGE = 256 << 10
#: The exec WebSocket's own log: a lost connection is the session's ``error`` event,
#: not a traceback on the user's terminal.
_WS_LOG = logging.getLogger("ember.sdk.websocket")
_WS_LOG.setLevel(logging.CRITICAL)


class _Default:
    """The client's own timeout (a type, so that mypy tells it from None)."""


DEFAULT = _Default()


class Client:
    """A connection to the Ember daemon.

    ``Client()`` talks to the default socket (``$EMBER_HOME/ember.sock``), or
    to ``$EMBER_HOST`` (``https://HOST:PORT`` or ``http://HOST:PORT``, with
    ``$EMBER_TOKEN``) when set. An ``https://`` daemon's certificate is verified,
    against ``ca`` (default ``$EMBER_TLS_CA``) or else the system's trust store.
    With ``autostart=True`` (or :meth:`connect_or_start`) a daemon is started
    when none answers on the Unix socket.

    ``transport`` replaces the HTTP transport (tests use ``httpx.MockTransport``).
    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *,
                 base_url: str | None = None, token: str | None = None,
                 timeout: float | None = c.DEFAULT_TIMEOUT, autostart: bool = False,
                 transport: httpx.BaseTransport | None = None,
                 ca: str | os.PathLike[str] | None = None) -> None:
        self.endpoint = c.resolve_endpoint(socket_path, base_url, token, ca)
        self._ssl = self.endpoint.ssl_context()
        self.timeout = timeout
        self._autostart = autostart and self.endpoint.socket_path is not None
        sock = self.endpoint.socket_path
        if transport is None and sock is not None:
            transport = httpx.HTTPTransport(uds=str(sock))
        self._http = httpx.Client(
            base_url=self.endpoint.base_url, headers=self.endpoint.headers(),
            transport=transport, verify=self._ssl if self._ssl is not None else True,
            timeout=httpx.Timeout(timeout, connect=c.CONNECT_TIMEOUT), trust_env=False)
        self.images = Images(self)
        self.machines = Machines(self)
        self.snapshots = Snapshots(self)
        self.volumes = Volumes(self)

    @classmethod
    def connect_or_start(cls, socket_path: str | os.PathLike[str] | None = None, *,
                         timeout: float | None = c.DEFAULT_TIMEOUT) -> Client:
        """A client whose daemon answers: started now (detached) if none did.

        Raises:
            DaemonUnavailable: the daemon could not be started; the message names daemon.log.
        """
        client = cls(socket_path, timeout=timeout, autostart=True)
        try:
            client.version()
        except BaseException:
            client.close()
            raise
        return client

    def version(self) -> models.Version:
        return models.Version.model_validate_json(self._request("GET", "/v1/version").content)

    def stats(self, all: bool = False) -> list[models.MachineStats]:
        """The host usage of every running machine (``all``: every machine)."""
        resp = self._request("GET", "/v1/stats", params={"all": all})
        return [models.MachineStats.model_validate(x) for x in json.loads(resp.content)]

    def events(self, since: int | None = None, follow: bool = True) -> Iterator[models.Event]:
        """Machine events (``created``, ``started``, ``stopped``...) as they happen.

        ``since``: first replay the recorded events with a greater ``seq``.
        ``follow=False``: only the replay. Stop iterating (or close the
        iterator) to disconnect.
        """
        params: dict[str, Any] = {"follow": follow}
        if since is not None:
            params["since"] = since
        with self._stream("GET", "/v1/events", params=params) as resp:
            for line in resp.iter_lines():
                if line.strip():
                    yield models.Event.model_validate_json(line)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.endpoint.describe()!r})"

    # --- transport

    def _call(self, send: Callable[[], T]) -> T:
        try:
            try:
                return send()
            except (httpx.ConnectError, httpx.ConnectTimeout):
                if not self._autostart:
                    raise
                from ember.sdk.daemon import ensure_daemon

                assert self.endpoint.socket_path is not None
                ensure_daemon(self.endpoint.socket_path)
                self._autostart = False  # once: a daemon that died again is an error
                return send()
        except httpx.ConnectError as exc:
            raise DaemonUnavailable(_unreachable(self.endpoint, exc)) from None
        except httpx.TimeoutException:
            raise DaemonUnavailable(f"the ember daemon at {self.endpoint.describe()} did not "
                                    "answer in time") from None
        except httpx.TransportError as exc:
            raise DaemonUnavailable(f"lost the connection to the ember daemon at "
                                    f"{self.endpoint.describe()}: {exc}") from None

    def _request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                 json: Any = None, content: Any = None, headers: Mapping[str, str] | None = None,
                 timeout: float | None | _Default = DEFAULT) -> httpx.Response:
        """Send a request; 4xx/5xx raise. ``timeout``: seconds to wait for the answer
        (None: no limit), default the client's."""
        kw: dict[str, Any] = {"params": params, "json": json, "content": content,
                              "headers": headers}
        if not isinstance(timeout, _Default):
            kw["timeout"] = httpx.Timeout(timeout, connect=c.CONNECT_TIMEOUT)
        resp = self._call(lambda: self._http.request(method, path, **kw))
        if resp.status_code >= 400:
            raise c.api_error(resp.status_code, resp.content)
        return resp

    @contextlib.contextmanager
    def _stream(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                json: Any = None) -> Iterator[httpx.Response]:
        """A streamed response, with no read timeout (a follow may be quiet for hours)."""
        req = self._http.build_request(method, path, params=params, json=json,
                                       timeout=httpx.Timeout(None, connect=c.CONNECT_TIMEOUT))
        resp = self._call(lambda: self._http.send(req, stream=True))
        try:
            if resp.status_code >= 400:
                resp.read()
                raise c.api_error(resp.status_code, resp.content)
            yield resp
        except httpx.TransportError as exc:
            raise DaemonUnavailable(f"lost the connection to the ember daemon at "
                                    f"{self.endpoint.describe()}: {exc}") from None
        finally:
            resp.close()


def _unreachable(endpoint: c.Endpoint, exc: Exception) -> str:
    if endpoint.socket_path is not None:
        return (f"cannot reach the ember daemon at {endpoint.socket_path}: {exc} "
                "(start it with `ember serve`)")
    return c.unreachable(endpoint, exc)


class Images:
    """``client.images``: the daemon's image store."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self) -> list[models.Image]:
        return c.parse_list(models.Image, self._c._request("GET", "/v1/images").content)

    def get(self, ref: str) -> models.Image:
        """The image with this tag, id or id prefix. Raises NotFound."""
        resp = self._c._request("GET", f"/v1/images/{c.quote_ref(ref)}")
        return models.Image.model_validate_json(resp.content)

    def import_path(self, path: str | os.PathLike[str],
                    tag: str | None = None) -> models.ImageImported:
        """Import an OCI layout or docker-save archive at ``path`` *on the daemon's host*.

        A tag another image had moves to this one; ``moved_tags`` of the result says so.
        """
        body = {"path": os.path.abspath(path)} | ({"tag": tag} if tag is not None else {})
        resp = self._c._request("POST", "/v1/images/import", json=body, timeout=None)
        return models.ImageImported.model_validate_json(resp.content)

    def upload(self, source: str | os.PathLike[str] | IO[bytes] | bytes,
               tag: str | None = None) -> models.ImageImported:
        """Send an image archive (OCI layout tar or docker-save) to the daemon and import it."""
        params = {"tag": tag} if tag is not None else None
        headers = {"content-type": "application/x-tar"}
        if isinstance(source, bytes):
            return self._upload(source, params, headers)
        if isinstance(source, str | os.PathLike):
            with open(source, "rb") as f:
                return self._upload(_chunks(f), params, headers)
        return self._upload(_chunks(source), params, headers)

    def _upload(self, content: Any, params: dict[str, str] | None,
                headers: dict[str, str]) -> models.ImageImported:
        resp = self._c._request("POST", "/v1/images/upload", params=params, content=content,
                                headers=headers, timeout=None)
        return models.ImageImported.model_validate_json(resp.content)

    def pull(self, reference: str, *, platform: str | None = None,
             progress: Callable[[models.PullEvent], None] | None = None,
             ca_cert: str | os.PathLike[str] | None = None) -> models.ImageImported:
        """Pull ``reference`` (``alpine``, ``host:5000/app:1``...) from its registry into
        the daemon's store; ``progress`` gets each event (resolved, per-layer bytes).

        Raises NotFound (no such image), APIError 403 (credentials), 424 (registry failed).
        """
        with self._c._stream("POST", "/v1/images/pull",
                             json=c.pull_body(reference, platform, ca_cert)) as resp:
            for line in resp.iter_lines():
                image = c.pull_line(line, progress)
                if image is not None:
                    return image
        raise error_for(502, "bad_stream", "the daemon's pull stream ended early")

    def tag(self, ref: str, tag: str) -> models.Image:
        """Give the image ``ref`` names the tag ``tag`` (taking it from another image)."""
        resp = self._c._request("POST", f"/v1/images/{c.quote_ref(ref)}/tag",
                                json=c.image_tag_body(tag))
        return models.Image.model_validate_json(resp.content)

    def remove(self, ref: str, force: bool = False) -> models.ImageRemoval:
        """``docker rmi``: a tag is untagged, and the image deleted with its last tag.

        Raises NotFound; Conflict when the image's last tag goes while a machine uses
        it, or ``ref`` is the id of an image with several tags, unless ``force``
        (which removes the tags and keeps an image in use, untagged, until unused).
        """
        resp = self._c._request("DELETE", f"/v1/images/{c.quote_ref(ref)}",
                                params={"force": "true"} if force else None)
        return models.ImageRemoval.model_validate_json(resp.content)

    def prune(self, all: bool = False) -> models.ImageRemoval:
        """Delete the untagged images no machine uses (``all``: every image none uses)."""
        resp = self._c._request("POST", "/v1/images/prune",
                                params={"all": "true"} if all else None, timeout=None)
        return models.ImageRemoval.model_validate_json(resp.content)


class Snapshots:
    """``client.snapshots``: snapshots of machines (``machine.snapshot()`` takes one)."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self, all: bool = False) -> list[models.Snapshot]:
        """User snapshots; ``all``: also the boot snapshots of ``ember run``'s warm starts."""
        resp = self._c._request("GET", "/v1/snapshots", params={"all": all})
        return c.parse_list(models.Snapshot, resp.content)

    def get(self, ref: str) -> models.Snapshot:
        """The snapshot with this id, id prefix or tag. Raises NotFound."""
        resp = self._c._request("GET", f"/v1/snapshots/{c.quote_ref(ref)}")
        return models.Snapshot.model_validate_json(resp.content)

    def remove(self, ref: str, force: bool = False) -> None:
        """Remove a snapshot. Raises Conflict while clones of it exist (``force``: the
        daemon's clones are removed first) or a running clone maps its memory."""
        self._c._request("DELETE", f"/v1/snapshots/{c.quote_ref(ref)}",
                         params={"force": force})


class Volumes:
    """``client.volumes``: named volumes (persistent disks machines mount by name)."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, name: str, size_bytes: int | None = None) -> models.Volume:
        """Make a volume (an empty ext4; default 10 GiB, stored sparse).

        Raises:
            InvalidRequest: a bad name or size. Conflict: the name is taken.
        """
        resp = self._c._request("POST", "/v1/volumes",
                                json=c.volume_create_body(name, size_bytes))
        return models.Volume.model_validate_json(resp.content)

    def list(self) -> list[models.Volume]:
        return c.parse_list(models.Volume, self._c._request("GET", "/v1/volumes").content)

    def get(self, name: str) -> models.Volume:
        """Raises NotFound."""
        resp = self._c._request("GET", f"/v1/volumes/{c.quote_name(name)}")
        return models.Volume.model_validate_json(resp.content)

    def remove(self, name: str) -> None:
        """Delete a volume and its data. Raises NotFound; Conflict while a running machine
        has it."""
        self._c._request("DELETE", f"/v1/volumes/{c.quote_name(name)}")


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(_UPLOAD_CHUNK):
        yield chunk


class Machines:
    """``client.machines``: create, list and find machines."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, image: str | None = None, *, snapshot: str | None = None,
               name: str | None = None, cpus: int | None = None,
               memory_mib: int | None = None, env: Mapping[str, str] | None = None,
               cmd: Sequence[str] | None = None, entrypoint: Sequence[str] | None = None,
               workdir: str | None = None, user: str | None = None,
               hostname: str | None = None, ports: Sequence[PortLike] | None = None,
               network: str | None = None, restart: str = "no", auto_remove: bool = False,
               start: bool = True, cold: bool = False,
               egress: EgressLike | None = None,
               volumes: Sequence[VolumeLike] | None = None,
               shares: Sequence[ShareLike] | None = None,
               rootfs_size: int | None = None, tmpfs_root: bool = False) -> MachineHandle:
        """Create a machine from ``image`` (or as a clone of ``snapshot``) and (unless
        ``start=False``) start it.

        A clone has its snapshot's vCPUs, memory and network (defaults: 1 vCPU,
        256 MiB, ``"user"`` for an image); without ``cmd``/``entrypoint`` its main
        process is the snapshot's own, still running.

        ``cmd``/``entrypoint`` replace the image's; with neither, and none in
        the image, the machine idles until stopped (a sandbox to exec into).
        ``ports``: ``"8080:80"``, ``"127.0.0.1:8080:80"``, ``80`` (any free host
        port), or :class:`~ember.api.models.PortSpec`. ``auto_remove``: the
        machine is removed when it stops (``run --rm``). ``egress``: where the
        guest may connect, ``{"allow": ["1.1.1.1:53", "10.0.0.0/8"], "deny": [...]}``
        (needs a root daemon's tap network; see :meth:`MachineHandle.update`). If
        the boot fails the machine is removed again, so no half-made machine is
        left behind. ``volumes``: named volumes to mount, ``[{"name": "data",
        "target": "/data", "readonly": False}]`` or ``["data:/data:ro"]`` (at most 16;
        each must exist: :attr:`Client.volumes`); a ``"HOSTDIR:/PATH[:ro]"`` there is
        a host share, as ``-v`` takes it. ``shares``: directories of the daemon's host
        shared live with the guest, ``[{"source": "/srv/app", "target": "/app",
        "readonly": False}]`` or ``["/srv/app:/app:ro"]`` (at most 32; a string's
        relative or ``~`` directory is made absolute here, against this process's
        cwd; the daemon checks that it is a directory). Writes are seen both ways;
        what the guest creates belongs to the directory's owner. A machine with
        volumes or shares starts warm but cannot be snapshotted. ``rootfs_size``: the
        bytes of the machine's writable root layer on disk (default 10 GiB, sparse),
        which keeps its file changes across stop and start until it is removed;
        ``tmpfs_root=True`` keeps that layer in guest memory instead.

        Raises:
            InvalidRequest: a value the API refuses (checked before sending), e.g. a
                malformed egress rule; a share's directory that is not one on the
                daemon's host.
            NotFound: no such image or volume. Conflict: the name or a host port is
                taken, a volume is in use by a running machine, or the daemon cannot
                enforce an egress policy.
        """
        body = c.machine_create_body(
            image, name=name, cpus=cpus, memory_mib=memory_mib, env=env, cmd=cmd,
            entrypoint=entrypoint, workdir=workdir, user=user, hostname=hostname, ports=ports,
            network=network, restart=restart, auto_remove=auto_remove, snapshot=snapshot,
            cold=cold, egress=egress, volumes=volumes, shares=shares,
            rootfs_size=rootfs_size, tmpfs_root=tmpfs_root)
        resp = self._c._request("POST", "/v1/machines", json=body)
        handle = MachineHandle(self._c, models.Machine.model_validate_json(resp.content))
        if start:
            try:
                handle.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    handle.remove(force=True)
                raise
        return handle

    def list(self, all: bool = True) -> list[MachineHandle]:
        """Every machine (``all=False``: only those starting, running, paused or stopping)."""
        resp = self._c._request("GET", "/v1/machines", params={"all": all})
        return [MachineHandle(self._c, m) for m in c.parse_list(models.Machine, resp.content)]

    def get(self, name: str) -> MachineHandle:
        """The machine with this name or id. Raises NotFound."""
        resp = self._c._request("GET", f"/v1/machines/{c.quote_name(name)}")
        return MachineHandle(self._c, models.Machine.model_validate_json(resp.content))


class MachineHandle(c.MachineRecord):
    """One machine: its last known record (``info``) and what can be done with it.

    As a context manager it removes the machine (forcibly) on exit.
    """

    def __init__(self, client: Client, info: models.Machine) -> None:
        self._c = client
        self.info = info

    def __enter__(self) -> MachineHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(NotFound):
            self.remove(force=True)

    @property
    def _path(self) -> str:
        return f"/v1/machines/{c.quote_name(self.id)}"

    def _update(self, resp: httpx.Response) -> models.Machine:
        self.info = models.Machine.model_validate_json(resp.content)
        return self.info

    # --- lifecycle

    def refresh(self) -> models.Machine:
        return self._update(self._c._request("GET", self._path))

    def start(self) -> models.Machine:
        """Boot the machine; returns when it runs (its main process started)."""
        return self._update(self._c._request("POST", f"{self._path}/start"))

    def stop(self, timeout: float = 10) -> models.Machine:
        """SIGTERM the main process, wait up to ``timeout`` s, then power off."""
        return self._update(self._c._request(
            "POST", f"{self._path}/stop", params={"timeout": timeout},
            timeout=max(self._c.timeout or 0, timeout + 60) if self._c.timeout else None))

    def kill(self, signal: int | str = "SIGKILL") -> models.Machine:
        """SIGKILL (default): power off at once (exit code 137). Another signal (a number
        or a name such as ``"SIGTERM"``) goes to the main process."""
        return self._update(self._c._request("POST", f"{self._path}/kill",
                                             params={"signal": c.signal_param(signal)}))

    def restart(self, timeout: float = 10) -> models.Machine:
        """Stop (as :meth:`stop`) if it runs, then start."""
        return self._update(self._c._request(
            "POST", f"{self._path}/restart", params={"timeout": timeout},
            timeout=max(self._c.timeout or 0, timeout + 120) if self._c.timeout else None))

    def update(self, *, egress: EgressLike | None | c.Keep = c.KEEP) -> models.Machine:
        """Change what the machine was created with; what is not given stays.

        ``egress``: its new egress policy (``{"allow": [...], "deny": [...]}``; None
        or no rules: none, public addresses only), kept for its next starts and
        applied at once if it runs (new connections; open ones stay).

        Raises:
            InvalidRequest: a malformed rule (checked before sending).
            Conflict: the machine (network none, slirp) or the daemon (not root)
                cannot enforce a policy; nothing changed.
        """
        return self._update(self._c._request("PATCH", self._path,
                                             json=c.machine_update_body(egress=egress)))

    def rename(self, name: str) -> models.Machine:
        """Give the machine a new name (its hostname stays). Raises Conflict if taken."""
        return self._update(self._c._request("POST", f"{self._path}/rename",
                                             json={"name": name}))

    def wait(self) -> models.WaitResult:
        """Block until the machine is no longer running (at once if it is not); how it
        ended: state, exit code, reason."""
        resp = self._c._request("POST", f"{self._path}/wait", timeout=None)
        return models.WaitResult.model_validate_json(resp.content)

    def snapshot(self, tag: str | None = None) -> models.Snapshot:
        """Snapshot this running or paused machine; it goes on afterwards."""
        body = {"tag": tag} if tag else {}
        resp = self._c._request("POST", f"{self._path}/snapshots", json=body)
        return models.Snapshot.model_validate_json(resp.content)

    def clone(self, count: int = 1, tag: str | None = None
              ) -> tuple[models.Snapshot, list[MachineHandle]]:
        """Snapshot this machine and start ``count`` clones of it; their handles."""
        body: dict[str, Any] = {"count": count}
        if tag:
            body["tag"] = tag
        resp = self._c._request("POST", f"{self._path}/clone", json=body)
        result = models.CloneResult.model_validate_json(resp.content)
        return result.snapshot, [MachineHandle(self._c, m) for m in result.machines]

    def pause(self) -> models.Machine:
        return self._update(self._c._request("POST", f"{self._path}/pause"))

    def resume(self) -> models.Machine:
        return self._update(self._c._request("POST", f"{self._path}/resume"))

    def remove(self, force: bool = False) -> None:
        """Delete the machine (``force``: even while it runs). Raises Conflict otherwise."""
        self._c._request("DELETE", self._path, params={"force": force})

    # --- exec

    def exec(self, cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
             workdir: str | None = None, user: str | None = None, tty: bool = False,
             stdin: bytes | str | None = None, timeout: float | None = None
             ) -> models.ExecResult:
        """Run ``cmd`` in the machine and wait for it: exit code and all output (UTF-8 text).

        A command that cannot be run (not found, not executable) is a result
        with exit code 126/127 and the reason on stderr, as with a shell.
        """
        body = c.exec_body(cmd, env=env, workdir=workdir, user=user, tty=tty, stdin=stdin,
                           timeout=timeout)
        resp = self._c._request("POST", f"{self._path}/exec", json=body,
                                timeout=c.request_timeout(self._c.timeout, timeout))
        return models.ExecResult.model_validate_json(resp.content)

    def stats(self) -> models.MachineStats:
        """What the machine costs the host now (cumulative CPU seconds, memory, I/O)."""
        resp = self._c._request("GET", f"{self._path}/stats")
        return models.MachineStats.model_validate_json(resp.content)

    def commit(self, tag: str | None = None, *, comment: str = "") -> models.Image:
        """A new image: this machine's image plus what it changed in its root (``ember
        commit``), read out of the running guest; tagged ``tag`` if given."""
        body = models.CommitCreate(tag=tag, comment=comment).model_dump(exclude_unset=True)
        resp = self._c._request("POST", f"{self._path}/commit", json=body)
        return models.Image.model_validate_json(resp.content)

    def changes(self) -> list[models.Change]:
        """What the machine added ("A"), changed ("C") and deleted ("D") in its root since
        it was made from its image (``ember diff``; it must be running)."""
        resp = self._c._request("GET", f"{self._path}/changes")
        return c.parse_list(models.Change, resp.content)

    def top(self) -> models.GuestProcesses:
        """The guest's processes (``ps`` run in the guest)."""
        resp = self._c._request("GET", f"{self._path}/top")
        return models.GuestProcesses.model_validate_json(resp.content)

    def exec_stream(self, cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
                    workdir: str | None = None, user: str | None = None, tty: bool = False,
                    stdin: bytes | str | None = None, timeout: float | None = None
                    ) -> Iterator[ExecEvent]:
        """Run ``cmd`` and yield its events as they come (output as bytes), ending with
        ``exit`` or ``error``. Leaving the loop early kills the process."""
        body = c.exec_body(cmd, env=env, workdir=workdir, user=user, tty=tty, stdin=stdin,
                           timeout=timeout)
        with self._c._stream("POST", f"{self._path}/exec/stream", json=body) as resp:
            for line in resp.iter_lines():
                if line.strip():
                    yield c.decode_exec_event(line)

    def exec_session(self, cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
                     workdir: str | None = None, user: str | None = None, tty: bool = False,
                     timeout: float | None = None) -> ExecSession:
        """Run ``cmd`` with live stdin (a WebSocket): what ``ember exec -it`` uses."""
        body = c.exec_body(cmd, env=env, workdir=workdir, user=user, tty=tty, stdin=None,
                           timeout=timeout)
        return ExecSession.open(self._c.endpoint, f"{self._path}/exec/ws", body,
                                ssl_context=self._c._ssl)

    # --- logs and files

    def logs(self, source: str = "output", follow: bool = False, tail: int = 0,
             since: float | datetime | None = None, timestamps: bool = False
             ) -> Iterator[bytes]:
        """The main process's output (``source="console"``: the serial console), raw bytes.

        ``tail``: only the last N lines (0: all). ``follow``: keep streaming
        until the machine stops (or the iterator is closed). ``since`` (Unix
        seconds or a datetime): only lines that arrived then or later;
        ``timestamps``: each line prefixed with its RFC 3339 arrival time.
        """
        params = c.logs_params(source, follow, tail, since, timestamps)
        with self._c._stream("GET", f"{self._path}/logs", params=params) as resp:
            yield from resp.iter_bytes()

    def put_archive(self, dest_dir: str, tar_bytes: bytes) -> None:
        """Extract a tar archive into ``dest_dir`` in the guest (created if missing)."""
        self._c._request("PUT", f"{self._path}/files", params={"path": c.guest_abs(dest_dir)},
                         content=tar_bytes, headers={"content-type": "application/x-tar"},
                         timeout=None)

    def get_archive(self, path: str) -> bytes:
        """A tar of the guest file or directory at ``path``, its entry named by its basename."""
        return self._c._request("GET", f"{self._path}/files",
                                params={"path": c.guest_abs(path)}, timeout=None).content

    def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write ``data`` to the guest file ``path`` (its directory is created if missing)."""
        parent, name = c.split_guest_path(c.guest_abs(path))
        self.put_archive(parent, c.single_file_tar(name, data, mode))

    def get_file(self, path: str) -> bytes:
        """The contents of the guest file ``path``."""
        return c.file_from_tar(self.get_archive(path), path)


class ExecSession:
    """A process with live stdin over the exec WebSocket (sync only).

    Iterate to receive :class:`ExecEvent` s (``stdout``/``stderr`` with bytes,
    then ``exit`` or ``error``); :meth:`send` / :meth:`close_stdin` /
    :meth:`resize` / :meth:`signal` may be called from other threads.

    The connection lives on an event loop of its own thread, so that output is
    read while a :meth:`send` waits for the process to take its stdin (a
    blocking socket client could not read while its write is stuck, and a
    process that answers its input with output would stall both ways).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread,
                 ws: Any) -> None:
        self._loop = loop
        self._thread = thread
        self._ws = ws
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._closed = False
        self.result: ExecEvent | None = None

    @classmethod
    def open(cls, endpoint: c.Endpoint, path: str, body: dict[str, Any], *,
             ssl_context: ssl.SSLContext | None = None) -> ExecSession:
        import asyncio

        from websockets.asyncio import client as wsc
        from websockets.exceptions import InvalidHandshake, InvalidStatus

        url = endpoint.ws_url(path)
        opts: dict[str, Any] = {"max_size": None, "compression": None,
                                "open_timeout": c.CONNECT_TIMEOUT, "logger": _WS_LOG}
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True,
                                  name="ember-exec-session")
        thread.start()

        async def connect() -> Any:
            if endpoint.socket_path is not None:
                return await wsc.unix_connect(str(endpoint.socket_path), uri=url, **opts)
            if endpoint.tls:
                opts["ssl"] = ssl_context or endpoint.ssl_context()
            return await wsc.connect(url, additional_headers=endpoint.headers(), proxy=None,
                                     **opts)

        try:
            ws = asyncio.run_coroutine_threadsafe(connect(), loop).result()
        except BaseException as exc:
            _stop(loop, thread)
            if isinstance(exc, InvalidStatus):
                raise c.api_error(exc.response.status_code,
                                  bytes(exc.response.body or b"")) from None
            if isinstance(exc, OSError | InvalidHandshake | TimeoutError):
                raise DaemonUnavailable(f"cannot open an exec session at "
                                        f"{endpoint.describe()}: {exc}") from None
            raise
        session = cls(loop, thread, ws)
        session._send(json.dumps(body))
        return session

    def _run(self, coro: Any) -> Any:
        """Run ``coro`` on the session's loop and wait for it (_Closed once closed)."""
        import asyncio

        with self._state_lock:
            if self._closed:
                coro.close()
                raise _Closed
            fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result()
        except concurrent.futures.CancelledError:  # close() cancelled it
            raise _Closed from None

    def _send(self, msg: str | bytes) -> None:
        from websockets.exceptions import ConnectionClosed

        with self._send_lock, contextlib.suppress(ConnectionClosed, _Closed):
            self._run(self._ws.send(msg))

    def send(self, data: bytes) -> None:
        """Write ``data`` (any size) to the process's stdin.

        Sent in messages of at most 256 KiB; returns once they are on their
        way, so it blocks while the process reads slower than this (the daemon
        and the guest agent hold only a bounded amount in flight). A session
        whose process has exited drops the data.
        """
        view = memoryview(data)
        for i in range(0, len(view), STDIN_MESSAGE):
            self._send(bytes(view[i:i + STDIN_MESSAGE]))

    def close_stdin(self) -> None:
        self._send(json.dumps({"type": "eof"}))

    def resize(self, rows: int, cols: int) -> None:
        """Tell the process's terminal (``tty=True``) its new size."""
        self._send(json.dumps({"type": "resize", "rows": rows, "cols": cols}))

    def signal(self, signum: int) -> None:
        self._send(json.dumps({"type": "signal", "signal": int(signum)}))

    def __iter__(self) -> Iterator[ExecEvent]:
        from websockets.exceptions import ConnectionClosed

        while self.result is None:
            try:
                msg = self._run(self._ws.recv())
            except (ConnectionClosed, _Closed) as exc:
                # 1008 with a reason: refused (over TCP without the token, say)
                rcvd = getattr(exc, "rcvd", None)
                why = rcvd.reason if rcvd is not None and rcvd.code == 1008 else ""
                self.result = ExecEvent(type="error", exit_code=125,
                                        message=f"the daemon refused the exec session: {why}"
                                        if why else "the exec session closed before the "
                                                    "process exited")
                yield self.result
                return
            if isinstance(msg, bytes):
                if msg[:1] in (b"\x01", b"\x02"):
                    yield ExecEvent(type="stdout" if msg[:1] == b"\x01" else "stderr",
                                    data=msg[1:])
                continue
            ev = c.decode_exec_event(msg)
            if ev.final:
                self.result = ev
            yield ev

    def close(self) -> None:
        """Close the session (the daemon kills a process still running). Idempotent.

        Calls blocked in other threads (a ``send``, the iteration) return.
        """
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        import asyncio

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_close(self._ws), self._loop).result()
        _stop(self._loop, self._thread)

    def __enter__(self) -> ExecSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Closed(Exception):
    """The session was closed (by :meth:`ExecSession.close`)."""


async def _close(ws: Any) -> None:
    """Close ``ws``, then end whatever still runs on the loop (waiters get _Closed)."""
    import asyncio

    with contextlib.suppress(Exception):
        await ws.close()
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()
