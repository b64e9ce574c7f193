"""``ember diff``'s reading of the guest's walk (``changes.py``), without a VM."""

from __future__ import annotations

from ember.changes import Change, parse


def test_the_walk_is_read_sorted_without_the_agents_own_files() -> None:
    text = ("A /srv\nC /etc\nC /etc/hostname\nA /etc/resolv.conf\nD /etc/group\n"
            "A /srv/x y\nbogus line\nX /what\nA relative\n")
    assert parse(text) == [Change("/etc", "C"), Change("/etc/group", "D"),
                           Change("/srv", "A"), Change("/srv/x y", "A")]


def test_etc_is_no_change_when_only_the_agent_wrote_there() -> None:
    assert parse("C /etc\nC /etc/hostname\nA /etc/hosts\nA /tmp\n") == [Change("/tmp", "A")]
    assert Change("/a", "D").to_json() == {"path": "/a", "kind": "D"}
