"""Egress policies through the API and the daemon, without a VM: create, PATCH, the record's
fields, the events and the watcher of denied connections.

A real Manager over a temporary data dir, as in test_api.py. A "running" machine is a
record in state running with a fake engine object (``FakeMachine``) standing in for
:class:`ember.machine.Machine`'s ``set_egress`` and ``egress_denied``; the daemon is
told its machines get the tap network (the test runs without root).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from api_helpers import err, sample_manager
from fastapi.testclient import TestClient

from ember.api.app import create_app
from ember.daemon import egress
from ember.daemon.managed import Managed
from ember.daemon.manager import Manager
from ember.errors import EmberError
from ember.vmm.egress import EgressPolicy

TAP = ("tap", "tap: a namespace and firewall per machine")
SLIRP = ("slirp", "slirp: a tap needs the full jail (root)")


class FakeMachine:
    """What the daemon's egress code asks of a running :class:`~ember.machine.Machine`."""

    vm = None  # no QEMU: the metrics and stats skip it

    def __init__(self, denied: int | None = 0, refuse: str | None = None) -> None:
        self.denied = denied
        self.refuse = refuse
        self.policies: list[EgressPolicy | None] = []
        self.reads = 0

    def set_egress(self, policy: EgressPolicy | None) -> None:
        if self.refuse is not None:
            raise EmberError(self.refuse)
        self.policies.append(policy)

    def egress_denied(self) -> int | None:
        self.reads += 1
        return self.denied


@pytest.fixture(scope="module")
def mgr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Manager]:
    with sample_manager(tmp_path_factory) as m:
        yield m


@pytest.fixture(scope="module")
def client(mgr: Manager) -> Iterator[TestClient]:
    with TestClient(create_app(mgr), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(autouse=True)
def tap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's machines get the tap network (a test that wants slirp says so)."""
    monkeypatch.setattr(egress, "backend", lambda: TAP)




def create(client: TestClient, name: str, **extra: Any) -> dict[str, Any]:
    r = client.post("/v1/machines", json={"image": "sample:latest", "name": name, **extra})
    assert r.status_code == 201, r.text
    return dict(r.json())


def events(mgr: Manager, name: str, kind: str) -> list[str | None]:
    return [e["detail"] for e in mgr.events.since(0, 100_000)
            if e["machine"] == name and e["type"] == kind]


def running(mm: Managed, fake: FakeMachine, started: str = "2024-01-01T00:00:00.000Z"
            ) -> None:
    """Make ``mm`` look like a machine that booted at ``started`` (engine: ``fake``)."""
    mm.machine = fake  # type: ignore[assignment]
    mm.doc.update(state="running", started_at=started)


def stopped(mm: Managed) -> None:
    mm.machine = None
    mm.doc.update(state="stopped")


# ------------------------------------------------------------- create


def test_create_keeps_the_policy_normalised_and_boots_with_it(client: TestClient,
                                                               mgr: Manager) -> None:
    m = create(client, "eg-create", egress={"allow": ["1.1.1.1:53", "10.1.2.3/8"],
                                            "deny": ["10.9.0.0/16"]})
    want = {"allow": ["1.1.1.1/32:53", "10.0.0.0/8"], "deny": ["10.9.0.0/16"]}
    assert m["egress"] == want and m["egress_denied"] is None
    assert client.get("/v1/machines/eg-create").json()["egress"] == want
    listed = {x["name"]: x for x in client.get("/v1/machines").json()}
    assert listed["eg-create"]["egress"] == want
    # what a start builds (daemon/managed.py's _boot): the machine boots with the policy
    mm = mgr.get("eg-create")
    config = mgr.machine_config(mm.doc, [])
    assert config.egress == EgressPolicy.from_json(want)


def test_a_machine_without_a_policy_has_none(client: TestClient, mgr: Manager) -> None:
    m = create(client, "eg-none")
    assert m["egress"] is None and m["egress_denied"] is None
    assert mgr.machine_config(mgr.get("eg-none").doc, []).egress is None
    # rules that add up to nothing are no policy
    assert create(client, "eg-empty", egress={"allow": [], "deny": []})["egress"] is None


@pytest.mark.parametrize(("body", "message"), [
    ({"allow": ["::1"]}, "egress rule '::1': IPv6 is not supported"),
    ({"deny": ["1.2.3.4:99999"]}, "egress rule '1.2.3.4:99999': the port must be"),
    ({"allow": ["1.1.1.1", "300.0.0.1"]}, "egress rule '300.0.0.1'"),
    ({"allow": ["1.1.1.1"] * 200, "deny": ["2.2.2.2"] * 57}, "at most 256 rules"),
])
def test_bad_rules_are_422_naming_the_rule(client: TestClient, body: dict[str, Any],
                                           message: str) -> None:
    r = client.post("/v1/machines", json={"image": "sample", "name": "eg-bad", "egress": body})
    assert message in err(r, 422, "invalid")
    err(client.get("/v1/machines/eg-bad"), 404)  # nothing was made


@pytest.mark.parametrize("body", [
    {"allow": "1.1.1.1"}, {"allow": [1]}, {"allow": ["1.1.1.1"] * 257}, {"permit": []},
    {"allow": ["x" * 301]}, {"allow": [""]}, [], "allow=1.1.1.1",
])
def test_malformed_egress_is_422_by_the_schema(client: TestClient, body: Any) -> None:
    r = client.post("/v1/machines", json={"image": "sample", "name": "eg-bad2", "egress": body})
    assert err(r, 422, "invalid").startswith("egress")


def test_a_policy_needs_a_network_and_a_daemon_that_enforces_it(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    r = client.post("/v1/machines", json={"image": "sample", "name": "eg-nonet",
                                          "network": "none", "egress": {"deny": ["1.1.1.1"]}})
    assert "egress policies need the tap network" in err(r, 422, "invalid")
    monkeypatch.setattr(egress, "backend", lambda: SLIRP)
    r = client.post("/v1/machines", json={"image": "sample", "name": "eg-slirp",
                                          "egress": {"deny": ["1.1.1.1"]}})
    msg = err(r, 409, "conflict")
    assert msg.startswith("egress policies need the tap network") and "slirp" in msg
    err(client.get("/v1/machines/eg-slirp"), 404)
    create(client, "eg-slirp")  # without a policy: as ever


# ------------------------------------------------------------- PATCH


def test_patch_a_stopped_machine_keeps_it_for_the_next_start(client: TestClient,
                                                             mgr: Manager) -> None:
    create(client, "eg-patch")
    r = client.patch("/v1/machines/eg-patch", json={"egress": {"allow": ["8.8.8.8:53"]}})
    assert r.status_code == 200, r.text
    assert r.json()["egress"] == {"allow": ["8.8.8.8/32:53"], "deny": []}
    mm = mgr.get("eg-patch")
    assert mgr.machine_config(mm.doc, []).egress == EgressPolicy.from_json(
        {"allow": ["8.8.8.8:53"]})
    assert mgr.db.machines()[[d["name"] for d in mgr.db.machines()].index("eg-patch")][
        "egress"] == {"allow": ["8.8.8.8/32:53"], "deny": []}  # in the daemon's database
    assert events(mgr, "eg-patch", "egress-updated") == [
        "egress policy: 1 rule allowed, nothing else (from its next start)"]
    # the fields not given stay: an empty PATCH changes nothing, and says nothing
    assert client.patch("/v1/machines/eg-patch", json={}).json()["egress"]["allow"] == [
        "8.8.8.8/32:53"]
    assert len(events(mgr, "eg-patch", "egress-updated")) == 1
    r = client.patch("/v1/machines/eg-patch", json={"egress": None})
    assert r.status_code == 200 and r.json()["egress"] is None
    assert mgr.machine_config(mm.doc, []).egress is None
    assert events(mgr, "eg-patch", "egress-updated")[-1] == \
        "egress policy cleared: public addresses only (from its next start)"


def test_patch_errors(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    assert err(client.patch("/v1/machines/ghost", json={"egress": None}), 404,
               "not_found") == "no machine named 'ghost'"
    create(client, "eg-errs")
    msg = err(client.patch("/v1/machines/eg-errs", json={"egress": {"allow": ["a:b:c"]}}),
              422, "invalid")
    assert msg == "egress rule 'a:b:c': IPv6 is not supported (guests are IPv4 only)"
    assert err(client.patch("/v1/machines/eg-errs", json={"cpus": 2}), 422) == \
        "cpus: unknown field"
    create(client, "eg-errs-none", network="none")
    msg = err(client.patch("/v1/machines/eg-errs-none", json={"egress": {"deny": ["1.1.1.1"]}}),
              409, "conflict")
    assert msg.startswith("egress policies need the tap network")
    # clearing is always allowed
    assert client.patch("/v1/machines/eg-errs-none", json={"egress": None}).status_code == 200
    monkeypatch.setattr(egress, "backend", lambda: SLIRP)
    msg = err(client.patch("/v1/machines/eg-errs", json={"egress": {"deny": ["1.1.1.1"]}}), 409)
    assert "egress policies need the tap network" in msg and "slirp" in msg
    assert client.get("/v1/machines/eg-errs").json()["egress"] is None  # nothing changed


def test_patch_a_running_machine_applies_it_at_once(client: TestClient, mgr: Manager) -> None:
    create(client, "eg-live")
    mm = mgr.get("eg-live")
    fake = FakeMachine(denied=4)
    running(mm, fake)
    try:
        r = client.patch("/v1/machines/eg-live",
                         json={"egress": {"allow": ["1.1.1.1"], "deny": ["1.1.1.1:25"]}})
        assert r.status_code == 200, r.text
        assert fake.policies == [EgressPolicy.from_json({"allow": ["1.1.1.1"],
                                                         "deny": ["1.1.1.1:25"]})]
        assert r.json()["egress"] == {"allow": ["1.1.1.1/32"], "deny": ["1.1.1.1/32:25"]}
        assert r.json()["egress_denied"] == 4  # read afresh after the change
        assert events(mgr, "eg-live", "egress-updated") == [
            "egress policy: 1 rule allowed, nothing else; 1 rule denied (applied now)"]
        client.patch("/v1/machines/eg-live", json={"egress": None})
        assert fake.policies[-1] is None
    finally:
        stopped(mm)


def test_patch_that_the_running_machine_cannot_enforce_is_409_and_changes_nothing(
        client: TestClient, mgr: Manager) -> None:
    create(client, "eg-refused", egress={"deny": ["10.0.0.0/8"]})
    mm = mgr.get("eg-refused")
    running(mm, FakeMachine(refuse="egress policies need the tap network (root's default); "
                                   "machine eg-refused is on slirp"))
    try:
        r = client.patch("/v1/machines/eg-refused", json={"egress": {"allow": ["1.1.1.1"]}})
        msg = err(r, 409, "conflict")
        assert msg.startswith("machine eg-refused: egress policies need the tap network")
        assert client.get("/v1/machines/eg-refused").json()["egress"] == {
            "allow": [], "deny": ["10.0.0.0/8"]}
        assert mgr.machine_config(mm.doc, []).egress == EgressPolicy.from_json(
            {"deny": ["10.0.0.0/8"]})
        assert events(mgr, "eg-refused", "egress-updated") == []
    finally:
        stopped(mm)


def test_clearing_nothing_on_a_running_machine_asks_nothing_of_it(client: TestClient,
                                                                  mgr: Manager) -> None:
    create(client, "eg-noop")
    mm = mgr.get("eg-noop")
    fake = FakeMachine(denied=None, refuse="egress policies need the tap network")
    running(mm, fake)  # e.g. on slirp: no policy to remove, no error
    try:
        r = client.patch("/v1/machines/eg-noop", json={"egress": None})
        assert r.status_code == 200 and r.json()["egress"] is None
    finally:
        stopped(mm)


# ------------------------------------------------------------- egress_denied and events


def test_egress_denied_is_read_for_one_machine_and_cached_for_the_list(
        client: TestClient, mgr: Manager) -> None:
    create(client, "eg-count")
    mm = mgr.get("eg-count")
    fake = FakeMachine(denied=7)
    running(mm, fake)
    try:
        listed = {x["name"]: x for x in client.get("/v1/machines").json()}
        assert listed["eg-count"]["egress_denied"] is None and fake.reads == 0  # not read yet
        assert client.get("/v1/machines/eg-count").json()["egress_denied"] == 7
        assert fake.reads == 1
        fake.denied = 9
        listed = {x["name"]: x for x in client.get("/v1/machines").json()}
        assert listed["eg-count"]["egress_denied"] == 7 and fake.reads == 1  # the last reading
        metrics = client.get("/metrics").text
        assert f'ember_machine_egress_denied_total{{id="{mm.id}",name="eg-count"}} 7.0' in \
            metrics
        # a reading of an earlier boot is not this one's
        mm.doc["started_at"] = "2024-01-02T00:00:00.000Z"
        listed = {x["name"]: x for x in client.get("/v1/machines").json()}
        assert listed["eg-count"]["egress_denied"] is None
    finally:
        stopped(mm)
    assert client.get("/v1/machines/eg-count").json()["egress_denied"] is None
    assert fake.reads == 1  # a stopped machine's counter is not read


def test_the_watcher_publishes_what_was_denied_since_its_last_report(
        client: TestClient, mgr: Manager) -> None:
    create(client, "eg-watch", egress={"allow": ["1.1.1.1"]})
    mm = mgr.get("eg-watch")
    fake = FakeMachine(denied=0)
    watch = egress.EgressWatch(mgr)
    running(mm, fake, started="2024-01-01T00:00:00.000Z")
    try:
        watch.poll_machine(mm)
        assert events(mgr, "eg-watch", "egress-denied") == []  # none dropped: nothing said
        fake.denied = 3
        watch.poll_machine(mm)
        watch.poll_machine(mm)  # no more: no event
        fake.denied = 4
        watch.poll()
        assert events(mgr, "eg-watch", "egress-denied") == [
            "3 connections denied (3 in all)", "1 connection denied (4 in all)"]
        assert mm.egress_denied() == 4
        # what was reported is in the record: a restarted daemon does not report it again
        doc = next(d for d in mgr.db.machines() if d["name"] == "eg-watch")
        assert doc["_egress_seen"] == ["2024-01-01T00:00:00.000Z", 4]
        again = egress.EgressWatch(mgr)
        again.poll_machine(mm)
        assert len(events(mgr, "eg-watch", "egress-denied")) == 2
        # a new boot has a new firewall, counting from 0
        running(mm, fake, started="2024-01-01T01:00:00.000Z")
        fake.denied = 2
        watch.poll_machine(mm)
        assert events(mgr, "eg-watch", "egress-denied")[-1] == "2 connections denied (2 in all)"
        # a counter that went back is one that started over (a firewall made anew)
        fake.denied = 1
        watch.poll_machine(mm)
        fake.denied = 2
        watch.poll_machine(mm)
        assert events(mgr, "eg-watch", "egress-denied")[-2:] == [
            "1 connection denied (1 in all)", "1 connection denied (2 in all)"]
        assert len(events(mgr, "eg-watch", "egress-denied")) == 5
    finally:
        stopped(mm)
    reads = fake.reads
    watch.poll()
    assert fake.reads == reads  # a stopped machine is left alone


def test_the_watcher_leaves_machines_off_the_tap_network_and_busy_ones_alone(
        client: TestClient, mgr: Manager, monkeypatch: pytest.MonkeyPatch) -> None:
    create(client, "eg-slirp-run")
    mm = mgr.get("eg-slirp-run")
    running(mm, FakeMachine(denied=None))
    try:
        egress.EgressWatch(mgr).poll_machine(mm)
        assert mm.egress_denied() is None and events(mgr, "eg-slirp-run", "egress-denied") == []
        fake = FakeMachine(denied=5)
        running(mm, fake)
        monkeypatch.setattr(egress, "LOCK_WAIT", 0.05)
        held = threading.Event()
        release = threading.Event()

        def hold() -> None:
            with mm.lock:  # a lifecycle action (a boot, a stop) holds the machine
                held.set()
                release.wait(10)

        t = threading.Thread(target=hold)
        t.start()
        held.wait(10)
        egress.EgressWatch(mgr).poll_machine(mm)
        assert events(mgr, "eg-slirp-run", "egress-denied") == []  # left to the next round
        release.set()
        t.join()
        egress.EgressWatch(mgr).poll_machine(mm)
        assert events(mgr, "eg-slirp-run", "egress-denied") == ["5 connections denied (5 in all)"]
    finally:
        stopped(mm)


def test_the_watcher_thread_polls_and_stops_cleanly(client: TestClient, mgr: Manager) -> None:
    create(client, "eg-thread")
    mm = mgr.get("eg-thread")
    running(mm, FakeMachine(denied=2))
    watch = egress.EgressWatch(mgr, interval=0.02)
    try:
        watch.start()
        deadline = time.monotonic() + 10
        while not events(mgr, "eg-thread", "egress-denied") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert events(mgr, "eg-thread", "egress-denied") == ["2 connections denied (2 in all)"]
        thread = watch._thread
        assert thread is not None and thread.name == "ember-egress-watch"
    finally:
        watch.stop()
        stopped(mm)
    assert not thread.is_alive()
    assert egress.POLL_INTERVAL == 5.0


def test_manager_close_stops_the_watcher(tmp_path: Any, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    monkeypatch.setenv("EMBER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EMBER_ACCEL", "tcg")
    m = Manager()
    m.egress_watch.start()
    thread = m.egress_watch._thread
    assert thread is not None and thread.is_alive()
    m.close()
    assert not thread.is_alive()


def test_the_openapi_document_has_the_route_and_fields(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    patch = doc["paths"]["/v1/machines/{name}"]["patch"]
    assert patch["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/MachineUpdate"}
    schemas = doc["components"]["schemas"]
    assert {"egress", "egress_denied"} <= set(schemas["Machine"]["properties"])
    assert "egress" in schemas["MachineCreate"]["properties"]
    assert set(schemas["Egress"]["properties"]) == {"allow", "deny"}


def test_clones_keep_the_policy_of_their_machine(client: TestClient, mgr: Manager,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A clone of a machine under an allowlist is under it too: cloning is no way out."""
    import types

    from ember.daemon import snapshots

    create(client, "eg-src", egress={"allow": ["1.1.1.1:443"]})
    bodies: list[Any] = []
    monkeypatch.setattr(mgr, "take_snapshot", lambda mm, tag: types.SimpleNamespace(id="s1"))
    monkeypatch.setattr(mgr, "create_from_snapshot", lambda body: bodies.append(body) or body)
    monkeypatch.setattr(snapshots, "_start", lambda mm: None)
    mgr.clone(mgr.get("eg-src"), 2, None)
    assert [b.egress.model_dump() for b in bodies] == [
        {"allow": ["1.1.1.1/32:443"], "deny": []}] * 2
    bodies.clear()
    create(client, "eg-src-open")
    mgr.clone(mgr.get("eg-src-open"), 1, None)
    assert bodies[0].egress is None
