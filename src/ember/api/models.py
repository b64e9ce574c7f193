"""The REST API's contract: every request and response body, as pydantic models.

These models *are* the API: the daemon validates requests with them, FastAPI
renders them into the OpenAPI document (docs/openapi.json), and the SDK parses
responses into them. Requests forbid unknown fields, so a typo is a 422 with
the field's name, not a silently ignored option.
"""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)

from ember.vmm.spec import MAX_CPUS, MAX_MEMORY_MIB, MIN_MEMORY_MIB, NAME_PATTERN

API_VERSION = "v1"

_NAME_RE = re.compile(NAME_PATTERN)
_ENV_KEY_RE = re.compile(r"^[^=\x00]+$")
#: Linux's MAX_ARG_STRLEN: the longest argument or NAME=value execve takes, with its NUL.
ARG_STRLEN = 128 << 10


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore", defer_build=True)


# --- errors ------------------------------------------------------------------


class ErrorBody(_Response):
    code: str = Field(description="A stable machine-readable code, e.g. `not_found`.")
    message: str = Field(description="One line for a human.")


class Error(_Response):
    """Every 4xx and 5xx response has this body."""

    error: ErrorBody


# --- images ------------------------------------------------------------------


class CommitCreate(_Request):
    """`POST /v1/machines/{name}/commit`: the new image's tag and history comment."""

    tag: str | None = Field(default=None, min_length=1, max_length=255,
                            description="Tag to give the new image, e.g. `app:2`.")
    comment: str = Field(default="", max_length=1024,
                         description="Its history entry's comment.")


class ImageImport(_Request):
    path: str = Field(min_length=1, max_length=4096,
                      description="A path on the daemon's host: an OCI layout (directory or "
                                  "tar) or a `docker save` archive.")
    tag: str | None = Field(default=None, min_length=1, max_length=255,
                            description="Tag to give the image, e.g. `app:1.0`.")


class ImagePull(_Request):
    reference: str = Field(min_length=1, max_length=512,
                           description="What to pull: `alpine`, `user/app:1`, "
                                       "`host:5000/a/b@sha256:…` (Docker's reference rules).")
    platform: str | None = Field(default=None, min_length=3, max_length=64,
                                 pattern=r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$",
                                 description="`os/arch[/variant]` to choose from a "
                                             "multi-platform index; default the host's.")
    ca_cert: str | None = Field(default=None, min_length=1, max_length=4096,
                                description="A PEM CA certificate to trust for this registry "
                                            "(a path on the daemon's host), besides "
                                            "/etc/containers/certs.d/HOST:PORT/*.crt.")


class ImageTag(_Request):
    tag: str = Field(min_length=1, max_length=255,
                     description="The new tag, e.g. `app:2` (`app` means `app:latest`). A tag "
                                 "another image has moves to this one.")


class ImageLayer(_Response):
    digest: str = Field(description="Digest of the layer blob as stored (compressed).")
    media_type: str
    size: int = Field(description="Size of the blob in bytes.")
    diff_id: str = Field(description="Digest of the uncompressed layer tar.")


class Image(_Response):
    id: str = Field(description="`sha256:` digest of the image config.")
    short_id: str
    tags: list[str] = Field(description="Empty for an untagged image (`prune` removes those "
                                        "that no machine uses).")
    size: int = Field(description="Uncompressed size of all layers, in bytes.")
    created: str
    layers: int = Field(description="The number of layers (`layer_details` has each).")
    entrypoint: list[str] | None
    cmd: list[str] | None
    env: list[str]
    workdir: str
    user: str
    exposed_ports: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    stop_signal: str = Field(default="", description="The config's StopSignal, empty if none.")
    manifest_digest: str | None = Field(
        default=None, description="Digest of the image manifest (none for a `docker save`).")
    layer_details: list[ImageLayer] = Field(default_factory=list)
    imported: str = Field(default="", description="When the image came into the store.")
    rootfs: str = Field(default="", description="Path of its EROFS root file system on the "
                                                "daemon's host.")
    repo_digests: list[str] = Field(default_factory=list, description="`NAME@DIGEST` for each "
                                    "registry reference it was pulled as.")
    pulled_as: str | None = Field(default=None, description="The reference of its last pull, "
                                                            "canonical.")


class TagMove(_Response):
    tag: str
    from_image: str = Field(description="Id of the image that had the tag (untagged now if "
                                        "it was its last one).")


class ImageImported(Image):
    """An imported image, and the tags the import took from other images."""

    moved_tags: list[TagMove] = Field(default_factory=list)


class PullEvent(_Response):
    """One line of `POST /v1/images/pull`: progress, then `done` with the image (or
    `error`)."""

    status: Literal["resolved", "layer", "message", "done", "error"]
    reference: str | None = None
    digest: str | None = Field(default=None, description="`resolved`: the digest the "
                                                          "registry serves for the reference.")
    id: str | None = Field(default=None, description="`layer`: the layer's digest; "
                                                     "`resolved`: the image id.")
    state: Literal["exists", "waiting", "downloading", "downloaded", "unpacked"] | None = None
    current: int | None = None
    total: int | None = None
    layers: int | None = None
    size: int | None = None
    source: str | None = None
    message: str | None = None
    code: int | None = Field(default=None, description="`error`: the HTTP status it would "
                                                       "have had before the stream began.")
    image: ImageImported | None = Field(default=None, description="`done`: the image.")


class ImageRemoval(_Response):
    """What `DELETE /v1/images/{ref}` or `POST /v1/images/prune` did."""

    untagged: list[str] = Field(default_factory=list, description="Tags removed.")
    deleted: list[str] = Field(default_factory=list, description="Ids of images deleted.")
    space_reclaimed: int = Field(default=0, description="Bytes freed on disk.")


# --- machines ----------------------------------------------------------------


class MachineState(StrEnum):
    created = "created"
    starting = "starting"
    running = "running"
    paused = "paused"
    stopping = "stopping"
    stopped = "stopped"
    crashed = "crashed"


class RestartPolicy(StrEnum):
    no = "no"
    on_failure = "on-failure"
    always = "always"


class NetworkMode(StrEnum):
    user = "user"
    none = "none"


class PortSpec(_Request):
    guest_port: StrictInt = Field(ge=1, le=65535)
    host_port: StrictInt = Field(default=0, ge=0, le=65535,
                           description="0: the daemon picks a free port.")
    host_ip: str = Field(default="127.0.0.1", pattern=r"^[0-9.]{7,15}$",
                         description="IPv4 address on the host to listen on.")
    protocol: Literal["tcp"] = "tcp"

    @field_validator("host_ip")
    @classmethod
    def _ipv4(cls, value: str) -> str:
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 address") from None
        return value


class Port(_Response):
    guest_port: int
    host_port: int
    host_ip: str
    protocol: str


Env = Annotated[dict[str, str], Field(max_length=1024)]


def _check_env(env: dict[str, str]) -> dict[str, str]:
    for key, value in env.items():
        if not _ENV_KEY_RE.match(key):
            raise ValueError(f"environment variable name {key!r} must be non-empty, "
                             "without '=' or NUL")
        if "\x00" in value:
            raise ValueError(f"environment variable {key} contains NUL")
        if len(_utf8(f"{key}={value}", f"environment variable {key!r}")) >= ARG_STRLEN:
            raise ValueError(f"environment variable {key!r} is longer than 128 KiB")
    return env


def _check_argv(argv: list[str] | None) -> list[str] | None:
    if argv is not None and any("\x00" in a for a in argv):
        raise ValueError("arguments may not contain NUL")
    if argv is not None and any(len(_utf8(a, "an argument")) >= ARG_STRLEN for a in argv):
        raise ValueError("an argument is longer than 128 KiB")
    return argv


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate, e.g. "\ud800" in the JSON
        raise ValueError(f"{what} is not valid Unicode") from None


#: One egress rule as the API takes it (``vmm/egress.py`` checks what it says).
EgressRule = Annotated[str, Field(min_length=1, max_length=300)]


class Egress(_Request):
    """Where the guest may open connections (the tap network only: a root daemon's).

    A rule is `CIDR` or `ADDRESS` (IPv4), or `DOMAIN` (`*.DOMAIN`: the names below
    it), optionally `:PORT` (TCP and UDP alike); `vmm/egress.py` has the details.
    No policy: public addresses only. `deny` rules are dropped on top of that.
    `allow` rules make an allowlist: the guest reaches what they name (private
    ranges included) and nothing else. At most 256 rules in all."""

    allow: list[EgressRule] = Field(default_factory=list, max_length=256,
                                    description="The only destinations the guest may reach "
                                                "(empty: no allowlist).")
    deny: list[EgressRule] = Field(default_factory=list, max_length=256,
                                   description="Destinations dropped whatever else says.")


#: A volume's name, as ``volumes/store.py`` takes it (Docker's rule: no ``/``).
VOLUME_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


class VolumeSpec(_Request):
    """A named volume for a machine (`-v NAME:/PATH[:ro]`)."""

    name: str = Field(pattern=VOLUME_NAME_PATTERN,
                      description="The volume (`POST /v1/volumes`); it must exist at create.")
    target: str = Field(min_length=2, max_length=201, pattern=r"^/",
                        description="Where the guest mounts it: an absolute path other "
                                    "than `/`, of letters, digits, `.`, `_`, `-` and `/`.")
    readonly: StrictBool = False


class ShareSpec(_Request):
    """A host directory shared with a machine (`-v HOSTDIR:/PATH[:ro]`)."""

    source: str = Field(min_length=2, max_length=4096, pattern=r"^/",
                        description="The directory, an absolute path on the daemon's host "
                                    "(symlinks are resolved at create); it must exist, and "
                                    "be neither `/` nor hold or be inside Ember's data "
                                    "directory.")
    target: str = Field(min_length=2, max_length=201, pattern=r"^/",
                        description="Where the guest sees it: an absolute path other "
                                    "than `/`, of letters, digits, `.`, `_`, `-` and `/`.")
    readonly: StrictBool = Field(default=False,
                                 description="Read-only, enforced on the host (a read-only "
                                             "mount), not only in the guest.")


class VolumeCreate(_Request):
    name: str = Field(pattern=VOLUME_NAME_PATTERN,
                      description="Unique name: letters, digits, `_`, `.`, `-`, starting "
                                  "with a letter or digit; at most 128 characters.")
    size_bytes: StrictInt | None = Field(
        default=None, ge=16 << 20, le=16 << 40,
        description="Its size (an empty ext4 of that size, stored sparse); default 10 GiB.")


class Volume(_Response):
    name: str
    size_bytes: int = Field(description="The size the guest sees.")
    disk_bytes: int = Field(description="What its sparse image takes on the host's disk.")
    created_at: str
    in_use: bool = Field(description="A running machine has it attached (it cannot be "
                                     "removed, nor attached to another machine).")
    path: str = Field(description="Its image file on the daemon's host.")


class MachineCreate(_Request):
    image: str | None = Field(default=None, min_length=1, max_length=512,
                              description="Image tag, id or id prefix (or give `snapshot`).")
    snapshot: str | None = Field(
        default=None, min_length=1, max_length=128,
        description="Start as a clone of this snapshot (id, id prefix or tag) instead of "
                    "booting an image: its processes go on running, its files are there, "
                    "its vCPUs, memory and network are the snapshot's. Without `cmd` or "
                    "`entrypoint` the main process is the snapshot's own.")
    name: str | None = Field(default=None, pattern=NAME_PATTERN,
                             description="Unique name; default: generated. Letters, digits, "
                                         "`_`, `.`, `-`; at most 63 characters.")
    cpus: StrictInt = Field(default=1, ge=1, le=MAX_CPUS)
    memory_mib: StrictInt = Field(default=256, ge=MIN_MEMORY_MIB, le=MAX_MEMORY_MIB)
    env: Env = Field(default_factory=dict, description="Added to (or replacing) the image's.")
    cmd: list[str] | None = Field(
        default=None, max_length=4096,
        description="Replaces the image's Cmd. The main process is entrypoint + cmd; when "
                    "that is empty the machine runs no main process and stays up until "
                    "stopped (a sandbox to exec into).")
    entrypoint: list[str] | None = Field(default=None, max_length=4096,
                                         description="Replaces the image's Entrypoint "
                                                     "(and drops its Cmd).")
    workdir: str | None = Field(default=None, max_length=4096, pattern=r"^/")
    user: str | None = Field(default=None, max_length=256, pattern=r"^[^\x00:]*(:[^\x00:]*)?$")
    hostname: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,61}[A-Za-z0-9])?$")
    ports: list[PortSpec] = Field(default_factory=list, max_length=64)
    network: NetworkMode = NetworkMode.user
    restart: RestartPolicy = RestartPolicy.no
    auto_remove: bool = Field(default=False,
                              description="Remove the machine when it stops (`run --rm`); "
                                          "not with a restart policy.")
    cold: bool = Field(default=False,
                       description="Boot at every start, even where a boot snapshot of the "
                                   "machine's shape would give a warm start.")
    rootfs_size: int | None = Field(
        default=None, ge=64 << 20, le=16 << 40,
        description="The size in bytes of the machine's writable root layer on disk (a "
                    "sparse ext4 image: it takes on the host what the guest wrote); "
                    "default 10 GiB. The layer keeps the machine's changes to its files "
                    "across stop and start until it is removed. Not with `tmpfs_root`.")
    tmpfs_root: StrictBool = Field(
        default=False,
        description="Keep the writable root layer in guest memory instead (gone at every "
                    "stop), as `ember run` does.")
    egress: Egress | None = Field(
        default=None,
        description="Egress policy (needs the tap network: a root daemon, network `user`); "
                    "none: public addresses only. A malformed rule is 422, naming it.")
    volumes: list[VolumeSpec] = Field(
        default_factory=list, max_length=16,
        description="Named volumes to attach (at most 16), as disks the guest mounts at "
                    "`target`; each must exist (404). Resolved at each start: one a running "
                    "machine has is a 409 then. A machine with volumes starts warm from a boot "
                    "snapshot of its shape (the guest mounts its own disks after the "
                    "restore) but cannot be snapshotted; not with `snapshot` (422).")
    shares: list[ShareSpec] = Field(
        default_factory=list, max_length=32,
        description="Host shares (at most 32): a directory on the daemon's host shared live "
                    "with the guest over virtio-9p at `target`. Writes are seen both ways "
                    "at once; `readonly` is enforced on the host. Ownership: what the guest "
                    "creates in a share belongs on the host to the directory's owner (to "
                    "the daemon's user, without root). A source that is not a directory "
                    "is a 422; mount paths of volumes and shares together must be unique "
                    "and cannot nest. A machine with shares starts warm like one with "
                    "volumes and cannot be snapshotted; not with `snapshot` (422).")

    _env = field_validator("env")(_check_env)
    _argv = field_validator("cmd", "entrypoint")(_check_argv)

    @model_validator(mode="after")
    def _one_root_layer(self) -> MachineCreate:
        if self.tmpfs_root and self.rootfs_size is not None:
            raise ValueError("rootfs_size and tmpfs_root exclude each other")
        return self

    @model_validator(mode="after")
    def _image_or_snapshot(self) -> MachineCreate:
        if (self.image is None) == (self.snapshot is None):
            raise ValueError("give exactly one of image and snapshot")
        if self.snapshot is not None and (self.volumes or self.shares):
            raise ValueError("a clone of a snapshot cannot have volumes or host shares: its "
                             "guest's memory would not match their contents")
        return self


class Machine(_Response):
    id: str
    name: str
    image: str = Field(description="The reference the machine was created from.")
    image_id: str
    snapshot: str | None = Field(default=None,
                                 description="The snapshot it is a clone of (its id), if any.")
    state: MachineState
    cpus: int
    memory_mib: int
    env: dict[str, str]
    cmd: list[str] | None
    entrypoint: list[str] | None
    workdir: str | None
    user: str | None
    hostname: str
    network: NetworkMode
    ports: list[Port] = Field(description="Ports published now (while the machine is active).")
    publish: list[Port] = Field(default_factory=list,
                                description="Ports asked for at create (host_port 0: any free "
                                            "port, chosen at each start).")
    restart: RestartPolicy
    auto_remove: bool = False
    restart_count: int = 0
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = Field(default=None,
                                  description="The main process's exit code "
                                              "(128+N for signal N), once it exited.")
    reason: str | None = Field(default=None,
                               description="Why the machine stopped or crashed.")
    pid: int | None = Field(default=None, description="The VMM's host pid while it runs.")
    accel: str | None = None
    limits: dict[str, str] = Field(default_factory=dict,
                                   description="Host-side limits applied to the VMM at its "
                                               "last boot (cgroup; `cgroup` is its path "
                                               "while it runs), empty when never applied.")
    confinement: Confinement | None = Field(
        default=None, description="How the VMM is confined, read from /proc while it runs.")
    egress: Egress | None = Field(
        default=None, description="Its egress policy (rules normalised: `10.1.2.3/8` is "
                                  "`10.0.0.0/8`), applied at each start; none: public "
                                  "addresses only.")
    egress_denied: int | None = Field(
        default=None,
        description="New connections its firewall dropped in this boot (the policy's rules "
                    "and the default ones), read by the daemon every 5 s and afresh for "
                    "`GET /v1/machines/{name}`; null when not running on the tap network, "
                    "or not read yet.")
    volumes: list[VolumeSpec] = Field(default_factory=list,
                                      description="The volumes asked for at create.")
    shares: list[ShareSpec] = Field(default_factory=list,
                                    description="The host shares asked for at create "
                                                "(`source` resolved).")
    rootfs_size: int | None = Field(
        default=None,
        description="The size of its writable root layer on disk (kept until the machine "
                    "is removed); null: the layer is guest memory (`tmpfs_root`, or a "
                    "clone of a snapshot taken of such a machine).")


class Confinement(_Response):
    """The VMM's jail as the kernel reports it (`host/jail.py`)."""

    mode: str = Field(description="full (root: own uid, namespaces, seccomp), rootless (a "
                                  "user namespace), seccomp (QEMU's filter only) or off.")
    slot: int | None = Field(default=None, description="Its host-wide jail slot (full).")
    uid: int
    gid: int
    capabilities: str = Field(description="CapEff, hex.")
    no_new_privs: bool
    seccomp: bool = Field(description="Every thread runs under a seccomp filter.")
    namespaces: list[str] = Field(description="The namespaces it does not share with the "
                                              "daemon.")
    own_root: bool = Field(description="Its root directory is not the host's.")
    threads: int


class MachineUpdate(_Request):
    """`PATCH /v1/machines/{name}`: the fields given change, the others stay."""

    egress: Egress | None = Field(
        default=None, description="The new egress policy (`null`: none), kept for the next "
                                  "starts and applied at once to a running machine.")


class MachineRename(_Request):
    name: str = Field(pattern=NAME_PATTERN, description="The new name.")


class WaitResult(_Response):
    """How the machine's run ended (`POST /machines/{name}/wait`)."""

    state: MachineState
    exit_code: int | None = Field(description="The main process's, as in the record; null "
                                              "when it has none (a crash, an idle machine).")
    reason: str | None = None


# --- exec --------------------------------------------------------------------


class ExecCreate(_Request):
    cmd: list[str] = Field(min_length=1, max_length=4096)
    env: Env = Field(default_factory=dict)
    workdir: str | None = Field(default=None, max_length=4096, pattern=r"^/")
    user: str | None = Field(default=None, max_length=256, pattern=r"^[^\x00:]*(:[^\x00:]*)?$")
    # Strict: the document says boolean / number; lax pydantic took 1, "yes" or true.
    tty: StrictBool = False
    stdin: str | None = Field(default=None, max_length=16 << 20,
                              description="Text written to the process's stdin, then EOF. "
                                          "Without it stdin is empty. Binary or longer "
                                          "input: the exec WebSocket.")
    timeout: StrictFloat | None = Field(default=None, gt=0, le=86400,
                                        description="Seconds; the process is killed after it.")

    _env = field_validator("env")(_check_env)
    _argv = field_validator("cmd")(_check_argv)


class ExecStarted(_Response):
    """`POST /v1/machines/{name}/exec/detach`: a process started and left running."""

    pid: int = Field(description="Its pid in the guest.")


class ExecResult(_Response):
    exit_code: int = Field(description="0-255; 128+N when killed by signal N.")
    signal: int | None = None
    stdout: str = Field(description="UTF-8 (invalid bytes replaced). With a TTY, all output.")
    stderr: str
    timed_out: bool = False
    truncated: bool = False


class ExecEvent(_Response):
    """One line of the NDJSON stream of `POST /machines/{name}/exec/stream`."""

    type: Literal["started", "stdout", "stderr", "exit", "error"]
    data: str | None = Field(default=None, description="Base64 bytes (stdout, stderr).")
    pid: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool | None = None
    truncated: bool | None = Field(default=None,
                                   description="On exit: output was dropped because the "
                                               "client stopped reading for too long.")
    message: str | None = None


# --- events ------------------------------------------------------------------


class MachineStats(_Response):
    """What a machine costs the host now (`GET /v1/machines/{name}/stats`, `/v1/stats`).

    Counters are cumulative: a CPU percentage is the change of `cpu_seconds` between two
    readings over the change of `time` (what `ember stats` shows)."""

    name: str
    id: str
    state: str
    time: float = Field(description="Unix time of the reading.")
    cpu_seconds: float = Field(description="CPU time of its QEMU (cgroup, else /proc).")
    cpus: int = Field(description="vCPUs it was given (100 % per vCPU at most).")
    memory_bytes: int = Field(description="Host memory it uses: cgroup memory.current, "
                                          "else QEMU's resident set.")
    memory_limit_bytes: int = Field(description="Guest memory it was given.")
    storage_read_bytes: int = Field(description="Bytes QEMU read from host storage.")
    storage_write_bytes: int = Field(description="Bytes QEMU wrote to host storage.")
    network_rx_bytes: int | None = Field(default=None, description="Bytes the guest's "
                                         "network interfaces (not lo) received, as the "
                                         "guest counts them; none without a running guest.")
    network_tx_bytes: int | None = Field(default=None, description="Bytes they sent.")


class GuestProcesses(_Response):
    """`GET /v1/machines/{name}/top`: the guest's processes, as busybox `ps` lists them."""

    titles: list[str]
    processes: list[list[str]]


class Change(_Response):
    """One entry of `GET /v1/machines/{name}/changes` (`ember diff`)."""

    path: str
    kind: Literal["A", "C", "D"] = Field(
        description="A: added, C: changed (or a directory with changes below), D: deleted.")


class Event(_Response):
    """One line of the NDJSON stream of `GET /events`."""

    seq: int
    time: str
    machine_id: str
    machine: str
    type: str = Field(description="created, starting, started, paused, resumed, stopping, "
                                  "stopped, crashed, restarting, deleted, exited, renamed, "
                                  "signalled, snapshot, egress-updated, egress-denied.")
    detail: str | None = None


class Version(_Response):
    version: str
    api: str
    accel: str
    accel_reason: str


def valid_name(name: str) -> bool:
    return bool(_NAME_RE.match(name))


class SnapshotCreate(_Request):
    tag: str | None = Field(default=None, pattern=NAME_PATTERN,
                            description="A unique name for the snapshot.")


class Snapshot(_Response):
    id: str
    kind: Literal["user", "boot"] = Field(
        description="`user`: taken on request; `boot`: `ember run`'s warm-start cache.")
    tag: str | None = None
    parent: str | None = Field(default=None, description="The machine it was taken of.")
    created: str
    image: str = Field(description="The image reference of the machine.")
    image_id: str
    cpus: int
    memory_mib: int
    network: NetworkMode
    accel: str
    qemu_version: str
    size_on_disk: int = Field(description="Bytes on disk (memory is stored sparse).")
    memory_allocated: int = Field(description="Bytes of guest memory the snapshot holds.")
    pause_ms: float = Field(description="How long the machine was stopped for the capture.")
    in_use: bool = Field(description="A running clone maps its memory (it cannot be removed).")
    clones: list[str] = Field(default_factory=list,
                              description="The daemon's machines created from it.")


class CloneCreate(_Request):
    count: StrictInt = Field(default=1, ge=1, le=256, description="How many clones.")
    tag: str | None = Field(default=None, pattern=NAME_PATTERN,
                            description="A tag for the snapshot the clones start from.")


class CloneResult(_Response):
    snapshot: Snapshot
    machines: list[Machine]
