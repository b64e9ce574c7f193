"""A machine's egress policy: where its guest may open connections (tap network only).

``--egress allow=RULE,...`` and ``deny=RULE,...`` (the API's ``{"allow": [...],
"deny": [...]}``), a RULE being ``CIDR`` or ``ADDRESS``, optionally ``:PORT``
(TCP and UDP alike):

* **no policy**: the default network's (``vmm/netns.py``): public addresses
  only; private, shared, link-local, loopback, multicast and reserved ranges
  are dropped;
* **deny** rules are dropped on top of that, whatever else says;
* **allow** rules make an allowlist: the guest reaches what they name (private
  ranges included: naming one is allowing it) and nothing else; DNS to the
  guest's resolver (10.0.2.3) is dropped too, as are DoT and any direct-IP
  traffic elsewhere.

A RULE may also be a ``DOMAIN`` (``api.example.com``, or ``*.example.com`` for
every name below it), optionally ``:PORT``: then the guest's DNS is Ember's own
resolver (``vmm/resolver.py``), which answers only names the policy allows and
adds the addresses of each answer to the machine's allowlist for their TTL;
a denied domain gets NXDOMAIN.

Rules are enforced by the machine's own nftables (sets in its namespace), and
a running machine's policy is replaced in one nftables transaction: it holds
at once, for new connections; those already open stay (conntrack).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from ember.errors import EmberError

#: The most rules one policy may hold (allow and deny together).
MAX_RULES = 256

_DOMAIN = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}\.?",
                     re.IGNORECASE)


@dataclass(frozen=True)
class Rule:
    """One destination: an IPv4 network or a domain, and a port (None: any)."""

    network: str | None = None
    port: int | None = None
    #: ``example.com`` (that name) or ``*.example.com`` (any name below it).
    domain: str | None = None

    def __str__(self) -> str:
        return (self.domain or self.network or "") + (
            f":{self.port}" if self.port is not None else "")


@dataclass(frozen=True)
class EgressPolicy:
    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()

    @property
    def allowlist(self) -> bool:
        return bool(self.allow)

    @property
    def domains(self) -> bool:
        """Whether a rule names a domain: then the guest's DNS is Ember's resolver."""
        return any(r.domain for r in (*self.allow, *self.deny))

    def to_json(self) -> dict[str, list[str]]:
        return {"allow": [str(r) for r in self.allow], "deny": [str(r) for r in self.deny]}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> EgressPolicy | None:
        """A policy from its JSON form (``{"allow": [...], "deny": [...]}``); None for none.

        Raises:
            EmberError: a malformed rule, one line naming it.
        """
        if not d:
            return None
        allow, deny = d.get("allow") or [], d.get("deny") or []
        if not isinstance(allow, list) or not isinstance(deny, list):
            raise EmberError("egress: allow and deny must be lists of rules")
        policy = cls(tuple(parse_rule(x) for x in allow), tuple(parse_rule(x) for x in deny))
        if len(policy.allow) + len(policy.deny) > MAX_RULES:
            raise EmberError(f"egress: at most {MAX_RULES} rules")
        return policy if policy.allow or policy.deny else None


def parse_rule(text: object) -> Rule:
    """``CIDR``, ``ADDRESS`` (IPv4) or ``DOMAIN`` (``*.DOMAIN``), optionally ``:PORT``.

    Raises:
        EmberError: anything else, one line naming it.
    """
    if not isinstance(text, str) or not text.strip():
        raise EmberError(f"egress rule {text!r}: expected CIDR or ADDRESS, optionally :PORT")
    spec = text.strip()
    host, port = spec, None
    if spec.count(":") == 1:
        host, _, p = spec.partition(":")
        if not p.isascii() or not p.isdigit() or not 1 <= int(p) <= 65535:
            raise EmberError(f"egress rule {text!r}: the port must be between 1 and 65535")
        port = int(p)
    elif ":" in spec:
        raise EmberError(f"egress rule {text!r}: IPv6 is not supported (guests are IPv4 only)")
    try:
        net = ipaddress.IPv4Network(host, strict=False)
    except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, ValueError):
        name = host.lower().rstrip(".")
        bare = name[2:] if name.startswith("*.") else name
        if _DOMAIN.fullmatch(bare) and "*" not in bare:
            return Rule(port=port, domain=name)
        raise EmberError(f"egress rule {text!r}: expected CIDR, ADDRESS (IPv4) or DOMAIN "
                         "(*.DOMAIN for the names below it), optionally :PORT") from None
    return Rule(str(net), port)


def parse_flag(values: list[str]) -> EgressPolicy | None:
    """``--egress`` values: ``allow=RULE,RULE`` and ``deny=RULE,...``, repeatable.

    Raises:
        EmberError: a value without ``allow=``/``deny=``, or a malformed rule.
    """
    allow: list[str] = []
    deny: list[str] = []
    for value in values:
        kind, sep, rules = value.partition("=")
        if not sep or kind.strip() not in ("allow", "deny"):
            raise EmberError(f"--egress {value!r}: use allow=RULE,... or deny=RULE,...")
        (allow if kind.strip() == "allow" else deny).extend(
            r for r in rules.split(",") if r.strip())
    return EgressPolicy.from_json({"allow": allow, "deny": deny})
