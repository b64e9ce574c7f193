"""The asynchronous client: :class:`AsyncClient`, the mirror of :class:`ember.Client`.

Same names, same arguments, same results and errors; methods are coroutines
and streams are async iterators::

    async with ember.AsyncClient() as client:
        async with await client.machines.create("app:1", cmd=["sleep", "600"]) as m:
            res = await m.exec(["echo", "hi"])
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import IO, Any, TypeVar

from ember._httpx import httpx
from ember.api import models
from ember.sdk import _common as c
from ember.sdk._common import EgressLike, ExecEvent, PortLike, ShareLike, VolumeLike
from ember.sdk.client import DEFAULT, _Default, _unreachable
from ember.sdk.errors import DaemonUnavailable, NotFound, error_for

T = TypeVar("T")
_UPLOAD_CHUNK = 1 << 20


class AsyncClient:
    """A connection to the Ember daemon for asyncio (or trio) code; see :class:`ember.Client`."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *,
                 base_url: str | None = None, token: str | None = None,
                 timeout: float | None = c.DEFAULT_TIMEOUT, autostart: bool = False,
                 transport: httpx.AsyncBaseTransport | None = None,
                 ca: str | os.PathLike[str] | None = None) -> None:
        self.endpoint = c.resolve_endpoint(socket_path, base_url, token, ca)
        ctx = self.endpoint.ssl_context()
        self.timeout = timeout
        self._autostart = autostart and self.endpoint.socket_path is not None
        sock = self.endpoint.socket_path
        if transport is None and sock is not None:
            transport = httpx.AsyncHTTPTransport(uds=str(sock))
        self._http = httpx.AsyncClient(
            base_url=self.endpoint.base_url, headers=self.endpoint.headers(),
            transport=transport, verify=ctx if ctx is not None else True,
            timeout=httpx.Timeout(timeout, connect=c.CONNECT_TIMEOUT), trust_env=False)
        self.images = AsyncImages(self)
        self.machines = AsyncMachines(self)
        self.snapshots = AsyncSnapshots(self)
        self.volumes = AsyncVolumes(self)

    @classmethod
    async def connect_or_start(cls, socket_path: str | os.PathLike[str] | None = None, *,
                               timeout: float | None = c.DEFAULT_TIMEOUT) -> AsyncClient:
        """A client whose daemon answers: started now (detached) if none did."""
        client = cls(socket_path, timeout=timeout, autostart=True)
        try:
            await client.version()
        except BaseException:
            await client.aclose()
            raise
        return client

    async def version(self) -> models.Version:
        resp = await self._request("GET", "/v1/version")
        return models.Version.model_validate_json(resp.content)

    async def stats(self, all: bool = False) -> list[models.MachineStats]:
        resp = await self._request("GET", "/v1/stats", params={"all": all})
        return [models.MachineStats.model_validate(x) for x in json.loads(resp.content)]

    async def events(self, since: int | None = None,
                     follow: bool = True) -> AsyncIterator[models.Event]:
        params: dict[str, Any] = {"follow": follow}
        if since is not None:
            params["since"] = since
        async with self._stream("GET", "/v1/events", params=params) as resp:
            async for line in resp.aiter_lines():
                if line.strip():
                    yield models.Event.model_validate_json(line)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncClient({self.endpoint.describe()!r})"

    # --- transport

    async def _call(self, send: Callable[[], Awaitable[T]]) -> T:
        try:
            try:
                return await send()
            except (httpx.ConnectError, httpx.ConnectTimeout):
                if not self._autostart:
                    raise
                import anyio.to_thread

                from ember.sdk.daemon import ensure_daemon

                sock = self.endpoint.socket_path
                assert sock is not None
                await anyio.to_thread.run_sync(lambda: ensure_daemon(sock))
                self._autostart = False
                return await send()
        except httpx.ConnectError as exc:
            raise DaemonUnavailable(_unreachable(self.endpoint, exc)) from None
        except httpx.TimeoutException:
            raise DaemonUnavailable(f"the ember daemon at {self.endpoint.describe()} did not "
                                    "answer in time") from None
        except httpx.TransportError as exc:
            raise DaemonUnavailable(f"lost the connection to the ember daemon at "
                                    f"{self.endpoint.describe()}: {exc}") from None

    async def _request(self, method: str, path: str, *,
                       params: Mapping[str, Any] | None = None, json: Any = None,
                       content: Any = None, headers: Mapping[str, str] | None = None,
                       timeout: float | None | _Default = DEFAULT) -> httpx.Response:
        kw: dict[str, Any] = {"params": params, "json": json, "content": content,
                              "headers": headers}
        if not isinstance(timeout, _Default):
            kw["timeout"] = httpx.Timeout(timeout, connect=c.CONNECT_TIMEOUT)
        resp = await self._call(lambda: self._http.request(method, path, **kw))
        if resp.status_code >= 400:
            raise c.api_error(resp.status_code, resp.content)
        return resp

    @contextlib.asynccontextmanager
    async def _stream(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                      json: Any = None) -> AsyncIterator[httpx.Response]:
        req = self._http.build_request(method, path, params=params, json=json,
                                       timeout=httpx.Timeout(None, connect=c.CONNECT_TIMEOUT))
        resp = await self._call(lambda: self._http.send(req, stream=True))
        try:
            if resp.status_code >= 400:
                await resp.aread()
                raise c.api_error(resp.status_code, resp.content)
            yield resp
        except httpx.TransportError as exc:
            raise DaemonUnavailable(f"lost the connection to the ember daemon at "
                                    f"{self.endpoint.describe()}: {exc}") from None
        finally:
            await resp.aclose()


class AsyncImages:
    """``client.images`` of an :class:`AsyncClient`."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def list(self) -> list[models.Image]:
        resp = await self._c._request("GET", "/v1/images")
        return c.parse_list(models.Image, resp.content)

    async def get(self, ref: str) -> models.Image:
        resp = await self._c._request("GET", f"/v1/images/{c.quote_ref(ref)}")
        return models.Image.model_validate_json(resp.content)

    async def pull(self, reference: str, *, platform: str | None = None,
                   progress: Callable[[models.PullEvent], None] | None = None,
                   ca_cert: str | os.PathLike[str] | None = None
                   ) -> models.ImageImported:
        """:meth:`Images.pull <ember.sdk.client.Images.pull>`, async."""
        async with self._c._stream("POST", "/v1/images/pull",
                                   json=c.pull_body(reference, platform, ca_cert)) as resp:
            async for line in resp.aiter_lines():
                image = c.pull_line(line, progress)
                if image is not None:
                    return image
        raise error_for(502, "bad_stream", "the daemon's pull stream ended early")

    async def import_path(self, path: str | os.PathLike[str],
                          tag: str | None = None) -> models.ImageImported:
        body = {"path": os.path.abspath(path)} | ({"tag": tag} if tag is not None else {})
        resp = await self._c._request("POST", "/v1/images/import", json=body, timeout=None)
        return models.ImageImported.model_validate_json(resp.content)

    async def upload(self, source: str | os.PathLike[str] | IO[bytes] | bytes,
                     tag: str | None = None) -> models.ImageImported:
        params = {"tag": tag} if tag is not None else None
        headers = {"content-type": "application/x-tar"}
        if isinstance(source, bytes):
            content: Any = source
            resp = await self._c._request("POST", "/v1/images/upload", params=params,
                                          content=content, headers=headers, timeout=None)
            return models.ImageImported.model_validate_json(resp.content)
        if isinstance(source, str | os.PathLike):
            with open(source, "rb") as f:
                return await self.upload(f, tag)
        resp = await self._c._request("POST", "/v1/images/upload", params=params,
                                      content=_achunks(source), headers=headers, timeout=None)
        return models.ImageImported.model_validate_json(resp.content)

    async def tag(self, ref: str, tag: str) -> models.Image:
        resp = await self._c._request("POST", f"/v1/images/{c.quote_ref(ref)}/tag",
                                      json=c.image_tag_body(tag))
        return models.Image.model_validate_json(resp.content)

    async def remove(self, ref: str, force: bool = False) -> models.ImageRemoval:
        resp = await self._c._request("DELETE", f"/v1/images/{c.quote_ref(ref)}",
                                      params={"force": "true"} if force else None)
        return models.ImageRemoval.model_validate_json(resp.content)

    async def prune(self, all: bool = False) -> models.ImageRemoval:
        resp = await self._c._request("POST", "/v1/images/prune",
                                      params={"all": "true"} if all else None, timeout=None)
        return models.ImageRemoval.model_validate_json(resp.content)


async def _achunks(f: IO[bytes]) -> AsyncIterator[bytes]:
    import anyio.to_thread

    while chunk := await anyio.to_thread.run_sync(f.read, _UPLOAD_CHUNK):
        yield chunk


class AsyncSnapshots:
    """See :class:`ember.sdk.client.Snapshots`."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def list(self, all: bool = False) -> list[models.Snapshot]:
        resp = await self._c._request("GET", "/v1/snapshots", params={"all": all})
        return c.parse_list(models.Snapshot, resp.content)

    async def get(self, ref: str) -> models.Snapshot:
        resp = await self._c._request("GET", f"/v1/snapshots/{c.quote_ref(ref)}")
        return models.Snapshot.model_validate_json(resp.content)

    async def remove(self, ref: str, force: bool = False) -> None:
        await self._c._request("DELETE", f"/v1/snapshots/{c.quote_ref(ref)}",
                               params={"force": force})


class AsyncVolumes:
    """See :class:`ember.sdk.client.Volumes`."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(self, name: str, size_bytes: int | None = None) -> models.Volume:
        resp = await self._c._request("POST", "/v1/volumes",
                                      json=c.volume_create_body(name, size_bytes))
        return models.Volume.model_validate_json(resp.content)

    async def list(self) -> list[models.Volume]:
        resp = await self._c._request("GET", "/v1/volumes")
        return c.parse_list(models.Volume, resp.content)

    async def get(self, name: str) -> models.Volume:
        resp = await self._c._request("GET", f"/v1/volumes/{c.quote_name(name)}")
        return models.Volume.model_validate_json(resp.content)

    async def remove(self, name: str) -> None:
        await self._c._request("DELETE", f"/v1/volumes/{c.quote_name(name)}")


class AsyncMachines:
    """``client.machines`` of an :class:`AsyncClient`."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(self, image: str | None = None, *, snapshot: str | None = None,
                     name: str | None = None, cpus: int | None = None,
                     memory_mib: int | None = None, env: Mapping[str, str] | None = None,
                     cmd: Sequence[str] | None = None, entrypoint: Sequence[str] | None = None,
                     workdir: str | None = None, user: str | None = None,
                     hostname: str | None = None, ports: Sequence[PortLike] | None = None,
                     network: str | None = None, restart: str = "no",
                     auto_remove: bool = False, start: bool = True,
                     cold: bool = False,
                     egress: EgressLike | None = None,
                     volumes: Sequence[VolumeLike] | None = None,
                     shares: Sequence[ShareLike] | None = None,
               rootfs_size: int | None = None, tmpfs_root: bool = False) -> AsyncMachineHandle:
        """See :meth:`ember.sdk.client.Machines.create`."""
        body = c.machine_create_body(
            image, name=name, cpus=cpus, memory_mib=memory_mib, env=env, cmd=cmd,
            entrypoint=entrypoint, workdir=workdir, user=user, hostname=hostname, ports=ports,
            network=network, restart=restart, auto_remove=auto_remove, snapshot=snapshot,
            cold=cold, egress=egress, volumes=volumes, shares=shares,
            rootfs_size=rootfs_size, tmpfs_root=tmpfs_root)
        resp = await self._c._request("POST", "/v1/machines", json=body)
        handle = AsyncMachineHandle(self._c, models.Machine.model_validate_json(resp.content))
        if start:
            try:
                await handle.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await handle.remove(force=True)
                raise
        return handle

    async def list(self, all: bool = True) -> list[AsyncMachineHandle]:
        resp = await self._c._request("GET", "/v1/machines", params={"all": all})
        return [AsyncMachineHandle(self._c, m)
                for m in c.parse_list(models.Machine, resp.content)]

    async def get(self, name: str) -> AsyncMachineHandle:
        resp = await self._c._request("GET", f"/v1/machines/{c.quote_name(name)}")
        return AsyncMachineHandle(self._c, models.Machine.model_validate_json(resp.content))


class AsyncMachineHandle(c.MachineRecord):
    """One machine, for async code; ``async with`` removes it (forcibly) on exit."""

    def __init__(self, client: AsyncClient, info: models.Machine) -> None:
        self._c = client
        self.info = info

    async def __aenter__(self) -> AsyncMachineHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(NotFound):
            await self.remove(force=True)

    @property
    def _path(self) -> str:
        return f"/v1/machines/{c.quote_name(self.id)}"

    def _update(self, resp: httpx.Response) -> models.Machine:
        self.info = models.Machine.model_validate_json(resp.content)
        return self.info

    async def refresh(self) -> models.Machine:
        return self._update(await self._c._request("GET", self._path))

    async def start(self) -> models.Machine:
        return self._update(await self._c._request("POST", f"{self._path}/start"))

    async def stop(self, timeout: float = 10) -> models.Machine:
        return self._update(await self._c._request(
            "POST", f"{self._path}/stop", params={"timeout": timeout},
            timeout=max(self._c.timeout, timeout + 60) if self._c.timeout else None))

    async def kill(self, signal: int | str = "SIGKILL") -> models.Machine:
        """See :meth:`ember.sdk.client.MachineHandle.kill`."""
        return self._update(await self._c._request(
            "POST", f"{self._path}/kill", params={"signal": c.signal_param(signal)}))

    async def restart(self, timeout: float = 10) -> models.Machine:
        return self._update(await self._c._request(
            "POST", f"{self._path}/restart", params={"timeout": timeout},
            timeout=max(self._c.timeout, timeout + 120) if self._c.timeout else None))

    async def update(self, *, egress: EgressLike | None | c.Keep = c.KEEP
                     ) -> models.Machine:
        """See :meth:`ember.sdk.client.MachineHandle.update`."""
        return self._update(await self._c._request("PATCH", self._path,
                                                   json=c.machine_update_body(egress=egress)))

    async def rename(self, name: str) -> models.Machine:
        return self._update(await self._c._request("POST", f"{self._path}/rename",
                                                   json={"name": name}))

    async def wait(self) -> models.WaitResult:
        """See :meth:`ember.sdk.client.MachineHandle.wait`."""
        resp = await self._c._request("POST", f"{self._path}/wait", timeout=None)
        return models.WaitResult.model_validate_json(resp.content)

    async def snapshot(self, tag: str | None = None) -> models.Snapshot:
        """See :meth:`ember.sdk.client.MachineHandle.snapshot`."""
        resp = await self._c._request("POST", f"{self._path}/snapshots",
                                      json={"tag": tag} if tag else {})
        return models.Snapshot.model_validate_json(resp.content)

    async def clone(self, count: int = 1, tag: str | None = None
                    ) -> tuple[models.Snapshot, list[AsyncMachineHandle]]:
        """See :meth:`ember.sdk.client.MachineHandle.clone`."""
        body: dict[str, Any] = {"count": count}
        if tag:
            body["tag"] = tag
        resp = await self._c._request("POST", f"{self._path}/clone", json=body)
        result = models.CloneResult.model_validate_json(resp.content)
        return result.snapshot, [AsyncMachineHandle(self._c, m) for m in result.machines]

    async def pause(self) -> models.Machine:
        return self._update(await self._c._request("POST", f"{self._path}/pause"))

    async def resume(self) -> models.Machine:
        return self._update(await self._c._request("POST", f"{self._path}/resume"))

    async def remove(self, force: bool = False) -> None:
        await self._c._request("DELETE", self._path, params={"force": force})

    async def exec(self, cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
                   workdir: str | None = None, user: str | None = None, tty: bool = False,
                   stdin: bytes | str | None = None, timeout: float | None = None
                   ) -> models.ExecResult:
        body = c.exec_body(cmd, env=env, workdir=workdir, user=user, tty=tty, stdin=stdin,
                           timeout=timeout)
        resp = await self._c._request("POST", f"{self._path}/exec", json=body,
                                      timeout=c.request_timeout(self._c.timeout, timeout))
        return models.ExecResult.model_validate_json(resp.content)

    async def stats(self) -> models.MachineStats:
        resp = await self._c._request("GET", f"{self._path}/stats")
        return models.MachineStats.model_validate_json(resp.content)

    async def commit(self, tag: str | None = None, *, comment: str = "") -> models.Image:
        """A new image: this machine's image plus what it changed in its root (``ember
        commit``), read out of the running guest; tagged ``tag`` if given."""
        body = models.CommitCreate(tag=tag, comment=comment).model_dump(exclude_unset=True)
        resp = await self._c._request("POST", f"{self._path}/commit", json=body)
        return models.Image.model_validate_json(resp.content)

    async def changes(self) -> list[models.Change]:
        """What the machine added ("A"), changed ("C") and deleted ("D") in its root since
        it was made from its image (``ember diff``; it must be running)."""
        resp = await self._c._request("GET", f"{self._path}/changes")
        return c.parse_list(models.Change, resp.content)

    async def top(self) -> models.GuestProcesses:
        resp = await self._c._request("GET", f"{self._path}/top")
        return models.GuestProcesses.model_validate_json(resp.content)

    async def exec_stream(self, cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
                          workdir: str | None = None, user: str | None = None,
                          tty: bool = False, stdin: bytes | str | None = None,
                          timeout: float | None = None) -> AsyncIterator[ExecEvent]:
        body = c.exec_body(cmd, env=env, workdir=workdir, user=user, tty=tty, stdin=stdin,
                           timeout=timeout)
        async with self._c._stream("POST", f"{self._path}/exec/stream", json=body) as resp:
            async for line in resp.aiter_lines():
                if line.strip():
                    yield c.decode_exec_event(line)

    async def logs(self, source: str = "output", follow: bool = False, tail: int = 0,
                   since: float | datetime | None = None, timestamps: bool = False
                   ) -> AsyncIterator[bytes]:
        params = c.logs_params(source, follow, tail, since, timestamps)
        async with self._c._stream("GET", f"{self._path}/logs", params=params) as resp:
            async for chunk in resp.aiter_bytes():
                yield chunk

    async def put_archive(self, dest_dir: str, tar_bytes: bytes) -> None:
        await self._c._request("PUT", f"{self._path}/files",
                               params={"path": c.guest_abs(dest_dir)}, content=tar_bytes,
                               headers={"content-type": "application/x-tar"}, timeout=None)

    async def get_archive(self, path: str) -> bytes:
        resp = await self._c._request("GET", f"{self._path}/files",
                                      params={"path": c.guest_abs(path)}, timeout=None)
        return resp.content

    async def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        parent, name = c.split_guest_path(c.guest_abs(path))
        await self.put_archive(parent, c.single_file_tar(name, data, mode))

    async def get_file(self, path: str) -> bytes:
        return c.file_from_tar(await self.get_archive(path), path)
