"""Shell completion: ``ember completion bash|zsh`` prints the script; the script asks
``ember __complete CWORD WORDS...`` for the candidates of the word being typed.

Candidates come from the real argument parser (commands, sub-commands, every
option of the command) and, for arguments named NAME/MACHINE, IMAGE and
SNAPSHOT, from the daemon over the lean path (``cli/wire.py``); a daemon that is
not running gives no names (completion never starts one). Install:

    source <(ember completion bash)     # in ~/.bashrc
    source <(ember completion zsh)      # in ~/.zshrc
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

BASH = r"""# ember completion for bash: source <(ember completion bash)
_ember_complete() {
    local IFS=$'\n' cur="${COMP_WORDS[COMP_CWORD]}"
    COMPREPLY=( $(compgen -W "$(ember __complete "$COMP_CWORD" "${COMP_WORDS[@]:1}" \
        2>/dev/null)" -- "$cur") )
}
complete -o default -F _ember_complete ember
"""

ZSH = r"""# ember completion for zsh: source <(ember completion zsh)
autoload -U +X bashcompinit && bashcompinit
""" + BASH

#: Positional arguments whose values the daemon knows, by metavar.
_DYNAMIC = {"NAME": "machines", "MACHINE": "machines", "IMAGE": "images",
            "SNAPSHOT": "snapshots"}


def _names(kind: str) -> list[str]:
    from ember.cli.wire import Wire
    from ember.sdk.endpoint import resolve_endpoint

    ep = resolve_endpoint(None, None, None)
    if ep.socket_path is not None and not ep.socket_path.exists():
        return []
    try:
        with Wire(ep, autostart=False) as w:
            if kind == "machines":
                return [m["name"] for m in w.call("GET", "/v1/machines", params={"all": True},
                                                  timeout=2)]
            if kind == "images":
                return [t for i in w.call("GET", "/v1/images", timeout=2) for t in i["tags"]]
            return [s.get("tag") or str(s["id"]).removeprefix("sha256:")[:12]
                    for s in w.call("GET", "/v1/snapshots", timeout=2)]
    except Exception:  # completion must never fail loudly
        return []


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def candidates(words: list[str], cword: int) -> list[str]:
    """What may come at position ``cword`` (1-based, as bash's COMP_CWORD) of ``words``
    (the command line after ``ember``)."""
    from ember.cli import _parser

    parser: argparse.ArgumentParser = _parser()
    before = words[:max(cword - 1, 0)]
    current = words[cword - 1] if 0 < cword <= len(words) else ""
    if "--" in before:
        return []  # the guest command: the shell's default completion
    positional: list[str] = []
    expecting_value = False
    for w in before:
        subs = _subparsers(parser)
        if expecting_value:
            expecting_value = False
            continue
        if w.startswith("-"):
            expecting_value = _takes_value(parser, w)
            continue
        if w in subs:
            parser = subs[w]
            positional = []
            continue
        positional.append(w)
    subs = _subparsers(parser)
    if expecting_value:
        return []
    if current.startswith("-"):
        return sorted(o for a in parser._actions for o in a.option_strings)
    if subs and not positional:
        return sorted(k for k in subs if not k.startswith("_"))
    metavar = _positional_metavar(parser, len(positional))
    kind = _DYNAMIC.get(metavar or "")
    return sorted(set(_names(kind))) if kind else []


def _takes_value(parser: argparse.ArgumentParser, option: str) -> bool:
    if "=" in option:
        return False
    for a in parser._actions:
        if option in a.option_strings:
            return a.nargs != 0
    return False


def _positional_metavar(parser: argparse.ArgumentParser, index: int) -> str | None:
    positionals = [a for a in parser._actions if not a.option_strings
                   and not isinstance(a, argparse._SubParsersAction)]
    for i, a in enumerate(positionals):
        many = a.nargs in ("+", "*", argparse.REMAINDER)
        if i == index or (many and index >= i):
            return str(a.metavar) if a.metavar else None
    return None


def cmd_completion(args: argparse.Namespace) -> int:
    sys.stdout.write(BASH if args.shell == "bash" else ZSH)
    return 0


def cmd_complete(args: argparse.Namespace) -> int:
    for c in candidates(list(args.words), args.cword):
        print(c)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("completion", help="print the shell completion script",
                       description="Print the completion script for bash or zsh. Install: "
                       "source <(ember completion bash) in ~/.bashrc (zsh: ~/.zshrc).")
    p.add_argument("shell", choices=("bash", "zsh"))
    p.set_defaults(func=cmd_completion)
    p = sub.add_parser("__complete")  # no help: not listed
    p.add_argument("cword", type=int)
    p.add_argument("words", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_complete)
