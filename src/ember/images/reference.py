"""Image references: Docker's grammar and normalisation.

This follows github.com/distribution/reference (``ParseNormalizedNamed`` followed
by ``TagNameOnly``), so a string means to Ember what it means to ``docker pull``::

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [ domain "/" ] path
    domain     := host [ ":" port ]       host: DNS-like name, IPv4, or [IPv6]
    path       := component ( "/" component )*
    component  := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
    tag        := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
    digest     := algorithm ":" hex{32,}  (Ember handles only sha256:<64 lowercase hex>)

Normalisation, as Docker does it:

* The first ``/``-separated component is the domain only if it contains ``.`` or
  ``:`` or is ``localhost``; otherwise the domain is ``docker.io``. A name with no
  ``/`` at all is always on Docker Hub, so ``localhost:5000`` is
  ``docker.io/library/localhost`` with the tag ``5000``.
* ``index.docker.io`` is spelt ``docker.io``; a one-component path on Docker Hub
  gets ``library/`` (``alpine`` -> ``docker.io/library/alpine``).
* No tag and no digest means the tag ``latest``; with both, both are kept and the
  digest is what gets fetched.
* The path must be lowercase and at most 255 characters. A bare 64-digit hex
  string, or a bare digest, is refused: it names an image id, not a repository.

Where Ember differs from Docker: a first component with uppercase letters is not
taken as a domain (``Foo/bar`` is refused as not lowercase, where Docker would
contact a registry called ``Foo``); a first component that looks like a host but
is not a valid one (``foo_bar.com/app``) is refused rather than read as a path; a
bare ``sha256:<hex>`` is refused (Docker's ParseAnyReference reads it as an id);
and the familiar form keeps ``docker.io/`` where dropping it would change what
the string means (``docker.io/foo.com/bar``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ember.errors import ImageError

__all__ = ["InvalidReference", "Reference", "looks_like_reference", "parse"]

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
OFFICIAL_PREFIX = "library/"
DEFAULT_TAG = "latest"
PATH_MAX = 255

# The grammar, written out with explicit ASCII classes (Python's \w and \d are Unicode).
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_PATH = rf"{_COMPONENT}(?:/{_COMPONENT})*"
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*"
_IPV6 = r"\[[a-fA-F0-9:]+\]"
_DOMAIN = rf"(?:{_DOMAIN_NAME}|{_IPV6})(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"

_DOMAIN_RE = re.compile(_DOMAIN)
_COMPONENT_RE = re.compile(_COMPONENT)
_TAG_RE = re.compile(_TAG)
_DIGEST_RE = re.compile(_DIGEST)
_REMAINDER_RE = re.compile(rf"(?P<path>{_PATH})(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?")
_SHA256_HEX_RE = re.compile(r"[a-f0-9]{64}")
# What Docker's ParseAnyReference takes for an image id rather than a name.
_IDENTIFIER_RE = re.compile(r"[a-f0-9]{64}")
_BARE_DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128}")


class InvalidReference(ImageError):
    """A string that is not an image reference; its message is one line saying why."""


@dataclass(frozen=True)
class Reference:
    """A normalised image reference: ``domain/path[:tag][@digest]``."""

    domain: str
    path: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """The repository's full name, e.g. ``docker.io/library/alpine``."""
        return f"{self.domain}/{self.path}"

    @property
    def target(self) -> str:
        """What to ask ``/v2/<path>/manifests/`` for: the digest if any, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def familiar(self) -> str:
        """Docker's short form: ``alpine:latest``, ``user/app:1``, ``ghcr.io/x/y@sha256:...``."""
        name = self.name
        if self.domain == DEFAULT_DOMAIN:
            rest = self.path.removeprefix(OFFICIAL_PREFIX)
            if rest != self.path and "/" not in rest:
                name = rest
            elif not _is_domain(self.path.partition("/")[0]):
                # Unlike Docker, keep "docker.io/" when dropping it would make the first
                # path component read as a domain ("docker.io/foo.com/bar").
                name = self.path
        return name + self._suffix()

    def __str__(self) -> str:
        """The canonical form: ``docker.io/library/alpine:latest``, ``name:tag@digest``."""
        return self.name + self._suffix()

    @property
    def api_host(self) -> str:
        """The ``host[:port]`` to send registry HTTP requests to."""
        return DOCKER_HUB_API_HOST if self.domain == DEFAULT_DOMAIN else self.domain

    @property
    def is_loopback(self) -> bool:
        """Whether the domain's host is ``localhost``, in 127.0.0.0/8 or ``::1``."""
        host = _host_of(self.domain)
        if host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def _suffix(self) -> str:
        suffix = f":{self.tag}" if self.tag is not None else ""
        if self.digest is not None:
            suffix += f"@{self.digest}"
        return suffix


def parse(ref: str) -> Reference:
    """Parse and normalise an image reference the way ``docker pull`` does.

    ``alpine`` -> ``docker.io/library/alpine:latest``;
    ``index.docker.io/x`` -> ``docker.io/library/x:latest``;
    ``localhost:5000/a@sha256:...`` keeps its domain and has no tag.

    Raises:
        InvalidReference: ``ref`` is not an image reference (the message says why).
        ImageError: a well-formed digest uses an algorithm other than sha256.
    """
    if not ref:
        raise _invalid(ref, "it is empty")
    if _IDENTIFIER_RE.fullmatch(ref):
        raise _invalid(ref, "a bare 64-digit hex string is ambiguous (it looks like an image id)")
    if _BARE_DIGEST_RE.fullmatch(ref):
        raise _invalid(ref, "it is a digest with no repository name (e.g. alpine@<digest>)")

    domain, remainder = _split_domain(ref)
    repository = re.split(r"[:@]", remainder, maxsplit=1)[0]
    if repository != repository.lower():
        raise _invalid(ref, "repository name must be lowercase")
    if not _DOMAIN_RE.fullmatch(domain):
        raise _invalid(ref, _why_bad_domain(ref, domain))
    match = _REMAINDER_RE.fullmatch(remainder)
    if match is None:
        if "/" not in ref and ref.startswith("["):
            raise _invalid(ref, "a registry host needs a repository after it (host/name)")
        # Diagnose what the user wrote, not the "library/" we put in front of it.
        raise _invalid(ref, _why_bad_remainder(remainder if "/" in ref else ref))

    path, tag, digest = match.group("path", "tag", "digest")
    if len(path) > PATH_MAX:
        raise _invalid(
            ref, f"repository name must not be more than {PATH_MAX} characters (has {len(path)})"
        )
    if digest is not None:
        _check_digest(ref, digest)
    elif tag is None:
        tag = DEFAULT_TAG
    return Reference(domain=domain, path=path, tag=tag, digest=digest)


def looks_like_reference(value: str) -> bool:
    """True if :func:`parse` would accept ``value``."""
    try:
        parse(value)
    except ImageError:
        return False
    return True


# --- helpers -----------------------------------------------------------------------------


def _split_domain(ref: str) -> tuple[str, str]:
    """Split off the domain as Docker does, before any checking of the grammar."""
    first, slash, rest = ref.partition("/")
    if not slash:
        domain, remainder = DEFAULT_DOMAIN, OFFICIAL_PREFIX + ref
    elif first == LEGACY_DEFAULT_DOMAIN:
        domain, remainder = DEFAULT_DOMAIN, rest
    elif _is_domain(first):
        domain, remainder = first, rest
    else:
        domain, remainder = DEFAULT_DOMAIN, ref
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = OFFICIAL_PREFIX + remainder
    return domain, remainder


def _is_domain(component: str) -> bool:
    """Whether Docker takes a name's first component (one that has a '/' after it) for a domain."""
    return component == "localhost" or "." in component or ":" in component


def _check_digest(ref: str, digest: str) -> None:
    algorithm, _, encoded = digest.partition(":")
    if algorithm != "sha256":
        raise ImageError(
            f"unsupported digest algorithm {_quote(algorithm, 40)} in image reference "
            f"{_quote(ref)}: Ember only handles sha256"
        )
    if not _SHA256_HEX_RE.fullmatch(encoded):
        raise _invalid(ref, "a sha256 digest must be 64 lowercase hex digits")


def _host_of(domain: str) -> str:
    if domain.startswith("["):
        return domain[1:].partition("]")[0]
    return domain.partition(":")[0]


def _why_bad_domain(ref: str, domain: str) -> str:
    if "://" in ref:
        return "image references have no URL scheme (drop the 'scheme://')"
    return f"invalid registry host {_quote(domain, 60)}"


def _why_bad_remainder(remainder: str) -> str:
    """Say which part of a ``path[:tag][@digest]`` string breaks the grammar."""
    if any(c.isspace() or not c.isprintable() for c in remainder):
        return "it contains whitespace or control characters"
    head, at, digest = remainder.partition("@")
    path, colon, tag = head.partition(":")
    if not path:
        return "the repository name is missing"
    for component in path.split("/"):
        if not component:
            return "empty path component (a stray '/')"
        if not _COMPONENT_RE.fullmatch(component):
            return (
                f"invalid repository path component {_quote(component, 60)} "
                "(lowercase letters and digits, joined by '.', '_', '__' or dashes)"
            )
    if colon and not tag:
        return "empty tag after ':'"
    if colon and not _TAG_RE.fullmatch(tag):
        return (
            f"invalid tag {_quote(tag, 60)} (at most 128 letters, digits, '_', '.' or '-', "
            "not starting with '.' or '-')"
        )
    if at and not _DIGEST_RE.fullmatch(digest):
        return (
            f"invalid digest {_quote(digest, 60)} "
            "(want algorithm:hex, e.g. sha256:<64 hex digits>)"
        )
    return "invalid reference format"


def _invalid(ref: str, reason: str) -> InvalidReference:
    return InvalidReference(f"invalid image reference {_quote(ref)}: {reason}")


def _quote(text: str, limit: int = 100) -> str:
    """``repr`` of part of the user's string (one line, escapes shown), shortened if long."""
    if len(text) > limit:
        return repr(text[: limit - 20]) + f"... ({len(text)} characters)"
    return repr(text)
