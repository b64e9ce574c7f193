"""Registry configuration shared with docker and podman: credentials, policy and TLS trust.

* :func:`find_credentials` reads Ember's own ``auth.json``, the containers ``auth.json``
  files and docker's ``config.json`` (with credential helpers); :func:`login` and
  :func:`logout` edit Ember's own file.
* :func:`registry_policy` reads ``registries.conf`` (TOML, version 2): location rewrites,
  mirrors, insecure and blocked registries.
* :func:`ca_files` and :func:`ssl_context` read ``certs.d`` directories.

Missing files are skipped; a file that cannot be read or parsed raises
:class:`RegistryConfigError` with a one-line message naming it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember import paths
from ember.errors import ImageError

__all__ = [
    "Credentials",
    "Mirror",
    "RegistryConfigError",
    "RegistryPolicy",
    "ca_files",
    "find_credentials",
    "login",
    "logout",
    "registry_policy",
    "ssl_context",
]

TOKEN_USERNAME = "<token>"
"""The username docker's credential helpers use to mean "the secret is an identity token"."""

HUB_SERVER_URL = "https://index.docker.io/v1/"
"""The server URL docker uses for Docker Hub in ``config.json`` and with credential helpers."""

HELPER_TIMEOUT = 10.0
"""Seconds a credential helper may take before it counts as failed."""

_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_NOT_FOUND = "credentials not found in native keychain"


class RegistryConfigError(ImageError):
    """A registry configuration file or a credential helper could not be used."""


# --- credentials -------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """A username and password (or identity token) for one registry, and where they came from."""

    username: str
    password: str = field(repr=False)
    source: str

    @property
    def identity_token(self) -> str | None:
        """The password when it is an identity token (username ``<token>``), else None."""
        return self.password if self.username == TOKEN_USERNAME else None


def find_credentials(domain: str, repository: str, *, env: Mapping[str, str] | None = None,
                     ember_auth: Path | None = None) -> Credentials | None:
    """Credentials for pulling ``domain/repository``, or None when no file has any.

    ``domain`` is as in references ("docker.io", "127.0.0.1:5000"). Files, first match wins:
    ``ember_auth`` (default ``data_dir()/auth.json``), ``$REGISTRY_AUTH_FILE``,
    ``$XDG_RUNTIME_DIR/containers/auth.json``, ``$XDG_CONFIG_HOME/containers/auth.json``
    (default ``~/.config``) and ``$DOCKER_CONFIG/config.json`` (default ``~/.docker``).
    Within a file: ``credHelpers`` for the host, then ``auths`` entries (longest key prefix
    on path components first), then the ``credsStore`` default helper.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    own = ember_auth if ember_auth is not None else paths.data_dir() / "auth.json"
    host = _normalise_key(domain)
    candidates = _candidate_keys(host, repository)
    for path in _auth_files(own, environ):
        data = _load_json(path)
        if data is None:
            continue
        creds = _credentials_in(data, path, host, candidates, environ)
        if creds is not None:
            return creds
    return None


def login(domain: str, username: str, password: str, *, path: Path | None = None) -> Path:
    """Store credentials for ``domain`` in Ember's ``auth.json``; returns the file's path.

    The file uses the containers format (``{"auths": {domain: {"auth": base64}}}``), keeps
    any other content, and is written atomically with mode 0600 (its directory, when
    created, gets 0700). Older keys naming the same registry (URL forms, Docker Hub aliases)
    are replaced.
    """
    target = path if path is not None else paths.data_dir() / "auth.json"
    key = _normalise_key(domain)
    if not key:
        raise RegistryConfigError(f"{target}: cannot log in to an empty registry name")
    if not username:
        raise RegistryConfigError(f"{target}: cannot store an empty username for {key}")
    if ":" in username:
        raise RegistryConfigError(f"{target}: a username cannot contain ':' ({key})")
    data = _load_json(target) or {}
    auths = _auths_of(data, target)
    for old in [k for k in auths if _normalise_key(k) == key]:
        del auths[old]
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    auths[key] = {"auth": token}
    data["auths"] = auths
    _write_json_atomic(target, data)
    return target


def logout(domain: str, *, path: Path | None = None) -> bool:
    """Remove ``domain`` from Ember's ``auth.json``; False when it had no entry."""
    target = path if path is not None else paths.data_dir() / "auth.json"
    key = _normalise_key(domain)
    data = _load_json(target)
    if data is None:
        return False
    auths = _auths_of(data, target)
    gone = [k for k in auths if _normalise_key(k) == key]
    if not gone:
        return False
    for old in gone:
        del auths[old]
    data["auths"] = auths
    _write_json_atomic(target, data)
    return True


def _auth_files(own: Path, env: Mapping[str, str]) -> list[Path]:
    """The credential files in lookup order, without duplicates."""
    home = _home(env)
    found: list[Path | None] = [own]
    found.append(Path(env["REGISTRY_AUTH_FILE"]) if env.get("REGISTRY_AUTH_FILE") else None)
    runtime = env.get("XDG_RUNTIME_DIR")
    found.append(Path(runtime) / "containers" / "auth.json" if runtime else None)
    config = env.get("XDG_CONFIG_HOME") or (str(home / ".config") if home else None)
    found.append(Path(config) / "containers" / "auth.json" if config else None)
    docker = env.get("DOCKER_CONFIG") or (str(home / ".docker") if home else None)
    found.append(Path(docker) / "config.json" if docker else None)
    result: list[Path] = []
    seen: set[str] = set()
    for p in found:
        if p is not None and os.path.abspath(p) not in seen:
            seen.add(os.path.abspath(p))
            result.append(p)
    return result


def _home(env: Mapping[str, str]) -> Path | None:
    if env.get("HOME"):
        return Path(env["HOME"])
    try:
        return Path.home()
    except RuntimeError:
        return None


def _normalise_key(key: str) -> str:
    """``https://index.docker.io/v1/`` → ``docker.io``, ``http://h:5000`` → ``h:5000``, ...

    URL keys keep only their host; plain keys keep their path (``host/ns/repo``). The host is
    lower-cased and Docker Hub's aliases become ``docker.io``.
    """
    k = key.strip()
    for scheme in ("https://", "http://"):
        if k.lower().startswith(scheme):
            k = k[len(scheme):].split("/", 1)[0]
            break
    k = k.strip("/")
    host, sep, rest = k.partition("/")
    host = host.lower()
    if host in _HUB_ALIASES:
        host = "docker.io"
    return host + sep + rest


def _host_of(key: str) -> str:
    return key.split("/", 1)[0]


def _candidate_keys(host: str, repository: str) -> list[str]:
    """``host/a/b``, ``host/a``, ``host``: the keys that match, longest first."""
    parts = [p for p in repository.split("/") if p]
    return [host + "".join("/" + p for p in parts[:n]) for n in range(len(parts), 0, -1)] + [host]


def _credentials_in(data: dict[str, Any], path: Path, host: str, candidates: list[str],
                    env: Mapping[str, str]) -> Credentials | None:
    """The credentials one file gives for the candidate keys, or None."""
    helpers = data.get("credHelpers", {})
    if not isinstance(helpers, dict):
        raise RegistryConfigError(f"{path}: \"credHelpers\" is not an object")
    asked: set[str] = set()
    by_key: dict[str, str] = {}
    for k, suffix in helpers.items():
        if not isinstance(suffix, str):
            raise RegistryConfigError(f"{path}: credHelpers entry {k!r} is not a string")
        by_key.setdefault(_normalise_key(k), suffix)
    for cand in candidates:
        suffix = by_key.get(cand, "")
        if suffix:
            asked.add(suffix)
            creds = _run_helper(suffix, host, env, f"credHelpers in {path}")
            if creds is not None:
                return creds
            break
    auths = _auths_of(data, path)
    grouped: dict[str, list[tuple[str, Any]]] = {}
    for k, entry in auths.items():
        grouped.setdefault(_normalise_key(k), []).append((k, entry))
    for cand in candidates:
        # A key written in its plain form before URL forms of the same registry.
        for k, entry in sorted(grouped.get(cand, []), key=lambda e: e[0] != cand):
            creds = _decode_entry(entry, k, path)
            if creds is not None:
                return creds
    store = data.get("credsStore", "")
    if not isinstance(store, str):
        raise RegistryConfigError(f"{path}: \"credsStore\" is not a string")
    if store and store not in asked:
        return _run_helper(store, host, env, f"credsStore in {path}")
    return None


def _auths_of(data: dict[str, Any], path: Path) -> dict[str, Any]:
    auths = data.get("auths", {})
    if not isinstance(auths, dict):
        raise RegistryConfigError(f"{path}: \"auths\" is not an object")
    return auths


def _decode_entry(entry: Any, key: str, path: Path) -> Credentials | None:
    """One ``auths`` entry: identitytoken, else auth (base64 user:pass), else username/password."""
    if not isinstance(entry, dict):
        raise RegistryConfigError(f"{path}: auths entry {key!r} is not an object")
    for name in ("auth", "username", "password", "identitytoken"):
        if not isinstance(entry.get(name, ""), str):
            raise RegistryConfigError(f"{path}: {name!r} of auths entry {key!r} is not a string")
    source = str(path)
    if entry.get("identitytoken"):
        return Credentials(TOKEN_USERNAME, entry["identitytoken"], source)
    if entry.get("auth"):
        raw: str = entry["auth"].strip()
        try:
            decoded = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise RegistryConfigError(
                f"{path}: \"auth\" of auths entry {key!r} is not base64 of user:password"
            ) from None
        user, sep, password = decoded.partition(":")
        if not sep or not user:
            raise RegistryConfigError(
                f"{path}: \"auth\" of auths entry {key!r} is not base64 of user:password")
        return Credentials(user, password, source)
    if entry.get("username") and entry.get("password"):
        return Credentials(entry["username"], entry["password"], source)
    return None


def _run_helper(suffix: str, host: str, env: Mapping[str, str], why: str) -> Credentials | None:
    """Ask ``docker-credential-<suffix> get`` for ``host``; None when it has nothing."""
    name = f"docker-credential-{suffix}"
    exe = shutil.which(name, path=env.get("PATH", os.defpath))
    if exe is None:
        raise RegistryConfigError(f"{name} ({why}) is not on PATH")
    server = HUB_SERVER_URL if _host_of(host) == "docker.io" else _host_of(host)
    try:
        proc = subprocess.run([exe, "get"], input=server + "\n", capture_output=True, text=True,
                              env=dict(env), timeout=HELPER_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise RegistryConfigError(
            f"{name} ({why}) timed out after {HELPER_TIMEOUT:g} s for {server}") from None
    except OSError as e:
        raise RegistryConfigError(f"{name} ({why}) could not run: {e.strerror or e}") from None
    if proc.returncode != 0:
        if _NOT_FOUND in proc.stdout or _NOT_FOUND in proc.stderr:
            return None
        detail = _last_line(proc.stderr) or _last_line(proc.stdout)
        detail = detail or f"exit status {proc.returncode}"
        raise RegistryConfigError(f"{name} ({why}) failed for {server}: {detail}")
    try:
        reply = json.loads(proc.stdout)
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or not all(
            isinstance(reply.get(k, ""), str) for k in ("Username", "Secret")):
        raise RegistryConfigError(f"{name} ({why}) gave no credentials JSON for {server}")
    if not reply.get("Secret"):
        return None
    return Credentials(reply.get("Username", ""), reply["Secret"], name)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _load_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when the file does not exist."""
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise RegistryConfigError(f"cannot read {path}: {e.strerror or e}") from None
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RegistryConfigError(
            f"{path}: malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise RegistryConfigError(f"{path}: malformed JSON: not UTF-8") from None
    if not isinstance(data, dict):
        raise RegistryConfigError(f"{path}: expected a JSON object at the top")
    return data


def _write_json_atomic(target: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``target`` via a 0600 temp file and a rename."""
    parent = target.parent
    try:
        if not parent.is_dir():
            parent.mkdir(parents=True, mode=0o700)
            os.chmod(parent, 0o700)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise RegistryConfigError(f"cannot write {target}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise RegistryConfigError(f"cannot write {target}: {e.strerror or e}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- registries.conf ---------------------------------------------------------------------


@dataclass(frozen=True)
class Mirror:
    """A place to try before the registry itself."""

    location: str
    """``host[:port][/path]``: pull ``<location>/<repository>`` from it."""
    insecure: bool


@dataclass(frozen=True)
class RegistryPolicy:
    """What ``registries.conf`` says about pulling one repository."""

    location: str
    """Where to pull from instead of the domain: ``<location>/<repository>`` (default domain)."""
    insecure: bool
    """Plain HTTP or unverified TLS allowed for ``location``."""
    blocked: bool
    mirrors: tuple[Mirror, ...]


@dataclass(frozen=True)
class _Rule:
    prefix: str
    location: str
    insecure: bool
    blocked: bool
    mirrors: tuple[Mirror, ...]
    source: Path


def registry_policy(domain: str, repository: str, *, env: Mapping[str, str] | None = None,
                    files: Sequence[Path] | None = None) -> RegistryPolicy:
    """The ``registries.conf`` policy for pulling ``domain/repository``.

    ``files`` are read in order (later ``[[registry]]`` tables replace earlier ones with the
    same prefix); by default ``$CONTAINERS_REGISTRIES_CONF``, else the user's
    ``containers/registries.conf`` if it exists, else ``/etc/containers/registries.conf``, then
    the ``registries.conf.d/*.conf`` drop-ins next to it in name order. The longest prefix
    matching on path-component boundaries wins (``*.example.com`` matches subdomains). The
    returned locations already include any rewrite of a namespaced prefix, so the repository
    is always ``<location>/<repository>``.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    chosen = list(files) if files is not None else _default_conf_files(environ)
    rules: dict[str, _Rule] = {}
    for path in chosen:
        for rule in _read_conf(path):
            rules[rule.prefix] = rule
    ref = f"{domain}/{repository}" if repository else domain
    best: _Rule | None = None
    for rule in rules.values():
        if _prefix_matches(rule.prefix, domain, ref) and (
                best is None or len(rule.prefix) > len(best.prefix)):
            best = rule
    if best is None:
        return RegistryPolicy(domain, False, False, ())
    if best.prefix.startswith("*."):
        location = best.location or domain
    else:
        location = _rewrite(best, best.location, ref, repository)
    mirrors = tuple(
        Mirror(m.location if best.prefix.startswith("*.")
               else _rewrite(best, m.location, ref, repository), m.insecure)
        for m in best.mirrors)
    return RegistryPolicy(location, best.insecure, best.blocked, mirrors)


def _default_conf_files(env: Mapping[str, str]) -> list[Path]:
    if env.get("CONTAINERS_REGISTRIES_CONF"):
        main = Path(env["CONTAINERS_REGISTRIES_CONF"])
    else:
        home = _home(env)
        config = env.get("XDG_CONFIG_HOME") or (str(home / ".config") if home else None)
        user = Path(config) / "containers" / "registries.conf" if config else None
        main = user if user is not None and user.exists() else Path(
            "/etc/containers/registries.conf")
    dropin_dir = main.parent / "registries.conf.d"
    try:
        dropins = sorted(p for p in dropin_dir.iterdir() if p.suffix == ".conf")
    except (FileNotFoundError, NotADirectoryError):
        dropins = []
    except OSError as e:
        raise RegistryConfigError(f"cannot read {dropin_dir}: {e.strerror or e}") from None
    return [main, *dropins]


def _read_conf(path: Path) -> Iterator[_Rule]:
    """The ``[[registry]]`` tables of one registries.conf file."""
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as e:
        raise RegistryConfigError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        doc = tomllib.loads(raw.decode())
    except tomllib.TOMLDecodeError as e:
        raise RegistryConfigError(f"{path}: malformed TOML: {e}") from None
    except UnicodeDecodeError:
        raise RegistryConfigError(f"{path}: malformed TOML: not UTF-8") from None
    tables = doc.get("registry", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise RegistryConfigError(f"{path}: \"registry\" must be an array of tables")
    for table in tables:
        yield _parse_rule(table, path)


def _parse_rule(table: dict[str, Any], path: Path) -> _Rule:
    prefix = _conf_str(table, "prefix", path)
    location = _conf_str(table, "location", path)
    if not prefix and not location:
        raise RegistryConfigError(f"{path}: a [[registry]] table needs a prefix or a location")
    prefix = prefix or location
    if prefix.startswith("*.") and location:
        raise RegistryConfigError(
            f"{path}: registry with wildcard prefix {prefix!r} cannot have a location")
    mirror_tables = table.get("mirror", [])
    if not isinstance(mirror_tables, list) or not all(isinstance(t, dict) for t in mirror_tables):
        raise RegistryConfigError(f"{path}: \"mirror\" of {prefix!r} must be an array of tables")
    mirrors = []
    for m in mirror_tables:
        where = _conf_str(m, "location", path)
        if not where:
            raise RegistryConfigError(f"{path}: a mirror of {prefix!r} has no location")
        mirrors.append(Mirror(where, _conf_bool(m, "insecure", path)))
    return _Rule(prefix, "" if prefix.startswith("*.") else location or prefix,
                 _conf_bool(table, "insecure", path), _conf_bool(table, "blocked", path),
                 tuple(mirrors), path)


def _conf_str(table: dict[str, Any], key: str, path: Path) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise RegistryConfigError(f"{path}: {key!r} must be a string")
    value = value.strip().rstrip("/")
    if "://" in value:
        raise RegistryConfigError(f"{path}: {key} {value!r} must not have a URL scheme")
    return value


def _conf_bool(table: dict[str, Any], key: str, path: Path) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise RegistryConfigError(f"{path}: {key!r} must be true or false")
    return value


def _prefix_matches(prefix: str, domain: str, ref: str) -> bool:
    if prefix.startswith("*."):
        host = domain.rsplit(":", 1)[0] if domain.count(":") == 1 else domain
        return host.endswith(prefix[1:]) and len(host) > len(prefix) - 1
    return ref == prefix or ref.startswith(prefix + "/")


def _rewrite(rule: _Rule, location: str, ref: str, repository: str) -> str:
    """The ``L`` with ``L/<repository>`` = ``location`` + what follows the prefix in ``ref``."""
    rewritten = location + ref[len(rule.prefix):]
    if not repository:
        return rewritten
    tail = "/" + repository
    if rewritten.endswith(tail) and len(rewritten) > len(tail):
        return rewritten[:-len(tail)]
    raise RegistryConfigError(
        f"{rule.source}: location {location!r} for prefix {rule.prefix!r} renames the "
        f"repository {repository!r}; only locations keeping the path below the prefix work")


# --- TLS -----------------------------------------------------------------------------------


def _default_certs_dirs() -> list[Path]:
    dirs = [Path("/etc/containers/certs.d"), Path("/etc/docker/certs.d")]
    with contextlib.suppress(RuntimeError):
        dirs.insert(0, Path.home() / ".config" / "containers" / "certs.d")
    return dirs


def ca_files(host: str, *, certs_d: Sequence[Path] | None = None,
             ) -> tuple[list[Path], tuple[Path, Path] | None]:
    """TLS trust for ``host`` ("127.0.0.1:5000") from ``<dir>/<host>/`` of each certs.d dir.

    Returns every ``*.crt`` (CA certificates, in directory then name order) and the first
    ``*.cert``/``*.key`` client pair (same stem). A ``.cert`` without its ``.key`` (or the
    reverse) raises :class:`RegistryConfigError`. Default dirs:
    ``~/.config/containers/certs.d``, ``/etc/containers/certs.d``, ``/etc/docker/certs.d``.
    """
    dirs = list(certs_d) if certs_d is not None else _default_certs_dirs()
    cas: list[Path] = []
    client: tuple[Path, Path] | None = None
    for base in dirs:
        d = base / host
        try:
            names = sorted(p for p in d.iterdir() if p.is_file())
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise RegistryConfigError(f"cannot read {d}: {e.strerror or e}") from None
        cas.extend(p for p in names if p.suffix == ".crt")
        for p in names:
            if p.suffix == ".cert" and not p.with_suffix(".key").is_file():
                raise RegistryConfigError(f"{d}: client certificate {p.name} has no "
                                          f"{p.with_suffix('.key').name}")
            if p.suffix == ".key" and not p.with_suffix(".cert").is_file():
                raise RegistryConfigError(f"{d}: client key {p.name} has no "
                                          f"{p.with_suffix('.cert').name}")
        if client is None:
            for p in names:
                if p.suffix == ".cert":
                    client = (p, p.with_suffix(".key"))
                    break
    return cas, client


def ssl_context(host: str, *, ca_cert: Path | None = None, insecure: bool = False,
                certs_d: Sequence[Path] | None = None) -> ssl.SSLContext:
    """A client context for ``host``: system CAs plus :func:`ca_files` plus ``ca_cert``.

    The client certificate from :func:`ca_files` is loaded if there is one. With
    ``insecure=True`` nothing is verified: only for a registry the policy names insecure.
    """
    cas, client = ca_files(host, certs_d=certs_d)
    if insecure:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context()
        for ca in [*cas, *([ca_cert] if ca_cert is not None else [])]:
            try:
                ctx.load_verify_locations(cafile=str(ca))
            except (ssl.SSLError, OSError) as e:
                raise RegistryConfigError(
                    f"{ca}: not a usable CA certificate: {_ssl_reason(e)}") from None
    if client is not None:
        cert, key = client
        try:
            ctx.load_cert_chain(str(cert), str(key))
        except (ssl.SSLError, OSError) as e:
            raise RegistryConfigError(
                f"{cert}: not a usable client certificate with {key.name}: {_ssl_reason(e)}"
            ) from None
    return ctx


def _ssl_reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return str(e.reason)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).splitlines()[0] if str(e) else type(e).__name__
