"""Registry configuration: credential files and helpers, login/logout, registries.conf, TLS."""

from __future__ import annotations

import base64
import datetime
import json
import ssl
import stat
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ember.errors import ImageError
from ember.images.registry import config
from ember.images.registry.config import (
    Credentials,
    Mirror,
    RegistryConfigError,
    RegistryPolicy,
    ca_files,
    find_credentials,
    login,
    logout,
    registry_policy,
    ssl_context,
)

# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    b = tmp_path / "bin"
    b.mkdir()
    return b


@pytest.fixture
def env(tmp_path: Path, home: Path, bin_dir: Path) -> dict[str, str]:
    """An environment pointing only into tmp_path (no XDG_* set: the defaults apply)."""
    return {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin",
            "HELPER_LOG": str(tmp_path / "helper.log")}


@pytest.fixture
def own(tmp_path: Path) -> Path:
    """Ember's own auth.json (not created)."""
    return tmp_path / "ember" / "auth.json"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_json(path: Path, doc: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def auths(**entries: Any) -> dict[str, Any]:
    return {"auths": entries}


def basic(user: str, password: str) -> dict[str, str]:
    return {"auth": b64(f"{user}:{password}")}


def find(env: dict[str, str], own: Path, domain: str = "registry.test",
         repository: str = "ns/app") -> Credentials | None:
    return find_credentials(domain, repository, env=env, ember_auth=own)


HELPER = """\
#!/bin/sh
[ "$1" = get ] || { echo "usage: get" >&2; exit 2; }
read -r url
echo "$url" >> "$HELPER_LOG"
case "$url" in
  https://index.docker.io/v1/)
    printf '{"ServerURL":"%s","Username":"hub","Secret":"hubpass"}\\n' "$url";;
  registry.test)
    printf '{"ServerURL":"%s","Username":"helper","Secret":"helperpass"}\\n' "$url";;
  127.0.0.1:5000)
    printf '{"ServerURL":"%s","Username":"<token>","Secret":"tok"}\\n' "$url";;
  *)
    echo "credentials not found in native keychain"; exit 1;;
esac
"""


def make_helper(bin_dir: Path, suffix: str, body: str = HELPER) -> Path:
    script = bin_dir / f"docker-credential-{suffix}"
    script.write_text(body)
    script.chmod(0o755)
    return script


def helper_calls(env: dict[str, str]) -> list[str]:
    log = Path(env["HELPER_LOG"])
    return log.read_text().splitlines() if log.exists() else []


def one_line(e: pytest.ExceptionInfo[RegistryConfigError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


# --- Credentials ---------------------------------------------------------------------------


def test_credentials_identity_token_and_repr() -> None:
    plain = Credentials("alice", "s3cret", "/x/auth.json")
    token = Credentials("<token>", "tok", "docker-credential-pass")
    assert plain.identity_token is None
    assert token.identity_token == "tok"
    assert "s3cret" not in repr(plain)
    assert issubclass(RegistryConfigError, ImageError)


# --- entry forms and keys ------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "expected"), [
    (basic("alice", "pw:with:colons"), ("alice", "pw:with:colons")),
    ({"auth": b64("alice:pw").rstrip("=")}, ("alice", "pw")),
    ({"username": "bob", "password": "pw2"}, ("bob", "pw2")),
    ({"identitytoken": "idtok"}, ("<token>", "idtok")),
    ({"auth": b64("alice:pw"), "identitytoken": "idtok"}, ("<token>", "idtok")),
    ({"auth": b64("alice:pw"), "email": "a@example.com"}, ("alice", "pw")),
])
def test_entry_forms(env: dict[str, str], own: Path, entry: dict[str, str],
                     expected: tuple[str, str]) -> None:
    write_json(own, auths(**{"registry.test": entry}))
    creds = find(env, own)
    assert creds is not None
    assert (creds.username, creds.password, creds.source) == (*expected, str(own))


@pytest.mark.parametrize("entry", [{}, {"username": "bob"}, {"password": "x"}, {"auth": ""}])
def test_entries_without_credentials_do_not_match(env: dict[str, str], own: Path,
                                                  entry: dict[str, str]) -> None:
    write_json(own, auths(**{"registry.test": entry}))
    assert find(env, own) is None


@pytest.mark.parametrize("key", ["docker.io", "index.docker.io", "registry-1.docker.io",
                                 "https://index.docker.io/v1/", "https://index.docker.io/v1",
                                 "index.docker.io/library"])
def test_docker_hub_keys(env: dict[str, str], own: Path, key: str) -> None:
    write_json(own, auths(**{key: basic("hub", "pw")}))
    creds = find(env, own, "docker.io", "library/alpine")
    assert creds is not None and creds.username == "hub"
    assert find(env, own, "quay.io", "library/alpine") is None


@pytest.mark.parametrize("key", ["http://127.0.0.1:5000", "https://127.0.0.1:5000/v2/",
                                 "127.0.0.1:5000", "127.0.0.1:5000/"])
def test_url_keys_normalise_to_host(env: dict[str, str], own: Path, key: str) -> None:
    write_json(own, auths(**{key: basic("local", "pw")}))
    creds = find(env, own, "127.0.0.1:5000", "x/y")
    assert creds is not None and creds.username == "local"
    assert find(env, own, "127.0.0.1:5001", "x/y") is None


def test_plain_key_preferred_over_url_form(env: dict[str, str], own: Path) -> None:
    write_json(own, auths(**{"https://index.docker.io/v1/": basic("old", "pw"),
                             "docker.io": basic("new", "pw")}))
    creds = find(env, own, "docker.io", "library/alpine")
    assert creds is not None and creds.username == "new"


def test_longest_path_prefix_wins(env: dict[str, str], own: Path) -> None:
    write_json(own, auths(**{
        "registry.test": basic("host", "pw"),
        "registry.test/ns": basic("ns", "pw"),
        "registry.test/ns/app": basic("repo", "pw"),
    }))

    def user(repo: str) -> str | None:
        c = find(env, own, "registry.test", repo)
        return c.username if c else None

    assert user("ns/app") == "repo"
    assert user("ns/app/sub") == "repo"
    assert user("ns/other") == "ns"
    assert user("nsx/app") == "host"       # a prefix only on component boundaries
    assert user("ns/appx") == "ns"
    assert user("other") == "host"


def test_empty_longer_entry_falls_back_to_shorter(env: dict[str, str], own: Path) -> None:
    write_json(own, auths(**{"registry.test": basic("host", "pw"), "registry.test/ns": {}}))
    creds = find(env, own)
    assert creds is not None and creds.username == "host"


# --- lookup order --------------------------------------------------------------------------


def _all_files(tmp_path: Path, env: dict[str, str], own: Path) -> list[Path]:
    """One file per lookup location, each with a different user for registry.test."""
    env["REGISTRY_AUTH_FILE"] = str(tmp_path / "raf" / "auth.json")
    env["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
    env["XDG_CONFIG_HOME"] = str(tmp_path / "cfg")
    env["DOCKER_CONFIG"] = str(tmp_path / "dockercfg")
    files = [own, Path(env["REGISTRY_AUTH_FILE"]),
             tmp_path / "run" / "containers" / "auth.json",
             tmp_path / "cfg" / "containers" / "auth.json",
             tmp_path / "dockercfg" / "config.json"]
    for i, f in enumerate(files):
        write_json(f, auths(**{"registry.test": basic(f"user{i}", f"pw{i}")}))
    return files


def test_lookup_order(tmp_path: Path, env: dict[str, str], own: Path) -> None:
    files = _all_files(tmp_path, env, own)
    for i, f in enumerate(files):
        creds = find(env, own)
        assert creds == Credentials(f"user{i}", f"pw{i}", str(f))
        f.unlink()
    assert find(env, own) is None


def test_first_file_with_a_matching_entry_wins(tmp_path: Path, env: dict[str, str],
                                               own: Path) -> None:
    files = _all_files(tmp_path, env, own)
    for f in files[:3]:
        write_json(f, auths(**{"elsewhere.test": basic("x", "y"), "registry.test": {}}))
    creds = find(env, own)
    assert creds is not None and creds.source == str(files[3])


def test_default_locations_under_home(env: dict[str, str], own: Path, home: Path) -> None:
    docker = write_json(home / ".docker" / "config.json",
                        auths(**{"registry.test": basic("docker", "pw")}))
    creds = find(env, own)
    assert creds is not None and creds.source == str(docker)
    podman = write_json(home / ".config" / "containers" / "auth.json",
                        auths(**{"registry.test": basic("podman", "pw")}))
    creds = find(env, own)
    assert creds is not None and creds.source == str(podman)


def test_empty_env_values_are_ignored(env: dict[str, str], own: Path, home: Path) -> None:
    env.update(REGISTRY_AUTH_FILE="", XDG_RUNTIME_DIR="", DOCKER_CONFIG="")
    docker = write_json(home / ".docker" / "config.json",
                        auths(**{"registry.test": basic("docker", "pw")}))
    creds = find(env, own)
    assert creds is not None and creds.source == str(docker)


def test_default_ember_auth_is_in_data_dir(tmp_path: Path, env: dict[str, str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_HOME", str(tmp_path / "emberhome"))
    path = write_json(tmp_path / "emberhome" / "auth.json",
                      auths(**{"registry.test": basic("ember", "pw")}))
    creds = find_credentials("registry.test", "ns/app", env=env)
    assert creds is not None and creds.source == str(path)


# --- credential helpers --------------------------------------------------------------------


def docker_config(home: Path, doc: dict[str, Any]) -> Path:
    return write_json(home / ".docker" / "config.json", doc)


def test_cred_helper_found(env: dict[str, str], own: Path, home: Path, bin_dir: Path) -> None:
    make_helper(bin_dir, "test")
    docker_config(home, {"credHelpers": {"registry.test": "test"},
                         "auths": {"registry.test": basic("file", "pw")}})
    assert find(env, own) == Credentials("helper", "helperpass", "docker-credential-test")
    assert helper_calls(env) == ["registry.test"]


def test_cred_helper_docker_hub_server_url(env: dict[str, str], own: Path, home: Path,
                                           bin_dir: Path) -> None:
    make_helper(bin_dir, "test")
    docker_config(home, {"credHelpers": {"https://index.docker.io/v1/": "test"}})
    assert find(env, own, "docker.io", "library/alpine") == \
        Credentials("hub", "hubpass", "docker-credential-test")
    assert helper_calls(env) == ["https://index.docker.io/v1/"]


def test_cred_helper_identity_token(env: dict[str, str], own: Path, home: Path,
                                    bin_dir: Path) -> None:
    make_helper(bin_dir, "test")
    docker_config(home, {"credsStore": "test"})
    creds = find(env, own, "127.0.0.1:5000", "x")
    assert creds is not None and creds.identity_token == "tok"


def test_cred_helper_not_found_falls_through(env: dict[str, str], own: Path, home: Path,
                                            bin_dir: Path) -> None:
    make_helper(bin_dir, "test")
    docker_config(home, {"credHelpers": {"other.test": "test"},
                         "auths": {"other.test": basic("file", "pw")}})
    creds = find(env, own, "other.test", "x")
    assert creds is not None and creds.username == "file"
    assert helper_calls(env) == ["other.test"]
    # nothing anywhere: None
    docker_config(home, {"credHelpers": {"other.test": "test"}})
    assert find(env, own, "other.test", "x") is None


def test_cred_helper_not_found_moves_to_next_file(env: dict[str, str], own: Path,
                                                  home: Path, bin_dir: Path) -> None:
    make_helper(bin_dir, "test")
    write_json(own, {"credHelpers": {"other.test": "test"}})
    docker = docker_config(home, auths(**{"other.test": basic("docker", "pw")}))
    creds = find(env, own, "other.test", "x")
    assert creds is not None and creds.source == str(docker)


def test_creds_store_for_every_host(env: dict[str, str], own: Path, home: Path,
                                    bin_dir: Path) -> None:
    make_helper(bin_dir, "store")
    docker_config(home, {"credsStore": "store", "auths": {"registry.test": {}}})
    assert find(env, own) == Credentials("helper", "helperpass", "docker-credential-store")
    creds = find(env, own, "docker.io", "library/alpine")   # no auths entry at all
    assert creds is not None and creds.username == "hub"
    assert find(env, own, "nowhere.test", "x") is None


def test_auths_entry_with_auth_beats_creds_store(env: dict[str, str], own: Path, home: Path,
                                                 bin_dir: Path) -> None:
    make_helper(bin_dir, "store")
    path = docker_config(home, {"credsStore": "store",
                                "auths": {"registry.test": basic("file", "pw")}})
    assert find(env, own) == Credentials("file", "pw", str(path))
    assert helper_calls(env) == []


def test_cred_helpers_beat_creds_store(env: dict[str, str], own: Path, home: Path,
                                       bin_dir: Path) -> None:
    make_helper(bin_dir, "test")
    make_helper(bin_dir, "store", "#!/bin/sh\necho should not run >&2\nexit 3\n")
    docker_config(home, {"credsStore": "store", "credHelpers": {"registry.test": "test"}})
    creds = find(env, own)
    assert creds is not None and creds.source == "docker-credential-test"


def test_cred_helper_failure(env: dict[str, str], own: Path, home: Path,
                             bin_dir: Path) -> None:
    make_helper(bin_dir, "broken",
                "#!/bin/sh\ncat >/dev/null\necho 'warming up' >&2\n"
                "echo 'gpg: decryption failed: No secret key' >&2\nexit 1\n")
    path = docker_config(home, {"credsStore": "broken"})
    with pytest.raises(RegistryConfigError) as e:
        find(env, own)
    msg = one_line(e)
    assert "docker-credential-broken" in msg and str(path) in msg
    assert msg.endswith("gpg: decryption failed: No secret key")


@pytest.mark.parametrize("output", ["not json", "[1]", '{"Username": 3, "Secret": "x"}'])
def test_cred_helper_bad_output(env: dict[str, str], own: Path, home: Path, bin_dir: Path,
                                output: str) -> None:
    make_helper(bin_dir, "odd", f"#!/bin/sh\ncat >/dev/null\necho '{output}'\n")
    docker_config(home, {"credsStore": "odd"})
    with pytest.raises(RegistryConfigError) as e:
        find(env, own)
    assert "docker-credential-odd" in one_line(e)


def test_cred_helper_missing_from_path(env: dict[str, str], own: Path, home: Path) -> None:
    path = docker_config(home, {"credsStore": "desktop"})
    with pytest.raises(RegistryConfigError) as e:
        find(env, own)
    msg = one_line(e)
    assert "docker-credential-desktop" in msg and str(path) in msg and "PATH" in msg


def test_cred_helper_timeout(env: dict[str, str], own: Path, home: Path, bin_dir: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "HELPER_TIMEOUT", 0.3)
    make_helper(bin_dir, "slow", "#!/bin/sh\nexec sleep 10\n")
    docker_config(home, {"credsStore": "slow"})
    with pytest.raises(RegistryConfigError) as e:
        find(env, own)
    assert "timed out" in one_line(e)


def test_cred_helper_sees_env(env: dict[str, str], own: Path, home: Path,
                              bin_dir: Path) -> None:
    make_helper(bin_dir, "envy", "#!/bin/sh\ncat >/dev/null\n"
                "printf '{\"Username\":\"u\",\"Secret\":\"%s\"}' \"$MY_SECRET\"\n")
    docker_config(home, {"credsStore": "envy"})
    env["MY_SECRET"] = "from-env"
    creds = find(env, own)
    assert creds is not None and creds.password == "from-env"


# --- malformed files -----------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "{not json", "[]", '"x"', '{"auths": []}', '{"auths": {"registry.test": "x"}}',
    '{"auths": {"registry.test": {"auth": "!!!not base64"}}}',
    '{"auths": {"registry.test": {"auth": "' + b64("nocolon") + '"}}}',
    '{"auths": {"registry.test": {"username": 1, "password": "x"}}}',
    '{"credHelpers": ["x"]}', '{"credHelpers": {"registry.test": 1}}', '{"credsStore": 1}',
])
def test_malformed_auth_file(env: dict[str, str], own: Path, text: str) -> None:
    own.parent.mkdir(parents=True)
    own.write_text(text)
    with pytest.raises(RegistryConfigError) as e:
        find(env, own)
    assert str(own) in one_line(e)


def test_malformed_json_message(env: dict[str, str], own: Path) -> None:
    own.parent.mkdir(parents=True)
    own.write_text('{\n  "auths": {,}\n}')
    with pytest.raises(RegistryConfigError) as e:
        find(env, own)
    assert one_line(e).startswith(f"{own}: malformed JSON")
    assert "line 2" in str(e.value)


def test_unreadable_auth_file(env: dict[str, str], own: Path) -> None:
    own.mkdir(parents=True)     # a directory where the file should be
    with pytest.raises(RegistryConfigError) as e:
        find(env, own)
    assert str(own) in one_line(e)


def test_missing_and_empty_files_are_skipped(env: dict[str, str], own: Path,
                                             tmp_path: Path) -> None:
    env["REGISTRY_AUTH_FILE"] = str(tmp_path / "nope" / "auth.json")
    env["DOCKER_CONFIG"] = str(tmp_path / "afile")
    (tmp_path / "afile").write_text("")     # $DOCKER_CONFIG/config.json under a file
    own.parent.mkdir(parents=True)
    own.write_text("  \n")
    assert find(env, own) is None


# --- login / logout ------------------------------------------------------------------------


def test_login_logout_round_trip(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "data" / "ember" / "auth.json"
    assert login("registry.test", "alice", "pw:1", path=path) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text()) == {"auths": {"registry.test": {"auth": b64("alice:pw:1")}}}
    assert find_credentials("registry.test", "ns/app", env=env, ember_auth=path) == \
        Credentials("alice", "pw:1", str(path))
    login("127.0.0.1:5000", "bob", "pw2", path=path)
    assert logout("registry.test", path=path) is True
    assert logout("registry.test", path=path) is False
    assert find_credentials("registry.test", "ns/app", env=env, ember_auth=path) is None
    assert find_credentials("127.0.0.1:5000", "x", env=env, ember_auth=path) is not None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["auth.json"]   # no temp files left


def test_login_keeps_other_content_and_replaces_aliases(tmp_path: Path) -> None:
    path = write_json(tmp_path / "auth.json", {
        "auths": {"https://index.docker.io/v1/": basic("old", "x"),
                  "other.test": basic("o", "p")},
        "credHelpers": {"gcr.io": "gcloud"}})
    path.chmod(0o644)
    login("index.docker.io", "new", "pw", path=path)
    doc = json.loads(path.read_text())
    assert doc["auths"] == {"other.test": basic("o", "p"), "docker.io": basic("new", "pw")}
    assert doc["credHelpers"] == {"gcr.io": "gcloud"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert logout("https://index.docker.io/v1/", path=path) is True
    assert json.loads(path.read_text())["auths"] == {"other.test": basic("o", "p")}


def test_logout_without_file(tmp_path: Path) -> None:
    assert logout("registry.test", path=tmp_path / "auth.json") is False
    assert not (tmp_path / "auth.json").exists()


def test_login_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_HOME", str(tmp_path / "eh"))
    assert login("registry.test", "a", "b") == tmp_path / "eh" / "auth.json"
    assert logout("registry.test") is True


def test_login_refuses_malformed_file_and_bad_username(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text("{oops")
    with pytest.raises(RegistryConfigError) as e:
        login("registry.test", "a", "b", path=path)
    assert str(path) in one_line(e)
    assert path.read_text() == "{oops"
    with pytest.raises(RegistryConfigError):
        login("registry.test", "a:b", "c", path=tmp_path / "new.json")
    with pytest.raises(RegistryConfigError):
        login("registry.test", "", "c", path=tmp_path / "new.json")
    assert not (tmp_path / "new.json").exists()


# --- registries.conf -----------------------------------------------------------------------


def conf(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_policy_no_match(tmp_path: Path) -> None:
    f = conf(tmp_path / "r.conf", """
        unqualified-search-registries = ["docker.io"]
        [[registry]]
        prefix = "quay.io"
        blocked = true
    """)
    assert registry_policy("docker.io", "library/alpine", files=[f]) == \
        RegistryPolicy("docker.io", False, False, ())
    assert registry_policy("docker.io", "x", files=[]) == RegistryPolicy("docker.io", False,
                                                                         False, ())


def test_policy_prefix_matching(tmp_path: Path) -> None:
    f = conf(tmp_path / "r.conf", """
        [[registry]]
        location = "registry.test"
        insecure = true

        [[registry]]
        prefix = "registry.test/ns"
        location = "registry.test/ns"
        blocked = true

        [[registry]]
        prefix = "registry.test/ns/app"
    """)

    def pol(repo: str) -> RegistryPolicy:
        return registry_policy("registry.test", repo, files=[f])

    assert pol("ns/app") == RegistryPolicy("registry.test", False, False, ())
    assert pol("ns/other") == RegistryPolicy("registry.test", False, True, ())
    assert pol("nsx/app") == RegistryPolicy("registry.test", True, False, ())
    assert pol("ns/appx").blocked is True
    assert registry_policy("registry.testx", "ns/app", files=[f]) == \
        RegistryPolicy("registry.testx", False, False, ())


def test_policy_location_and_mirrors(tmp_path: Path) -> None:
    f = conf(tmp_path / "r.conf", """
        [[registry]]
        prefix = "docker.io"
        location = "hub.internal:5000/proxy"

        [[registry.mirror]]
        location = "127.0.0.1:5000"
        insecure = true

        [[registry.mirror]]
        location = "mirror.test/hub/"
    """)
    assert registry_policy("docker.io", "library/alpine", files=[f]) == RegistryPolicy(
        "hub.internal:5000/proxy", False, False,
        (Mirror("127.0.0.1:5000", True), Mirror("mirror.test/hub", False)))


def test_policy_namespaced_prefix_rewrites(tmp_path: Path) -> None:
    f = conf(tmp_path / "r.conf", """
        [[registry]]
        prefix = "example.test/team"
        location = "internal.test/mirror/team"
        [[registry.mirror]]
        location = "cache.test/team"

        [[registry]]
        prefix = "example.test/renamed"
        location = "internal.test/other"
    """)
    pol = registry_policy("example.test", "team/app", files=[f])
    # internal.test/mirror/team/app and cache.test/team/app, as <location>/<repository>
    assert pol == RegistryPolicy("internal.test/mirror", False, False,
                                 (Mirror("cache.test", False),))
    with pytest.raises(RegistryConfigError) as e:
        registry_policy("example.test", "renamed/app", files=[f])
    assert str(f) in one_line(e)


def test_policy_wildcard_prefix(tmp_path: Path) -> None:
    f = conf(tmp_path / "r.conf", """
        [[registry]]
        prefix = "*.example.test"
        insecure = true
        [[registry.mirror]]
        location = "mirror.test"

        [[registry]]
        prefix = "a.example.test/secure"
    """)
    assert registry_policy("a.example.test:5000", "x", files=[f]) == RegistryPolicy(
        "a.example.test:5000", True, False, (Mirror("mirror.test", False),))
    assert registry_policy("a.example.test", "secure/x", files=[f]) == \
        RegistryPolicy("a.example.test", False, False, ())
    assert registry_policy("example.test", "x", files=[f]).insecure is False
    assert registry_policy("badexample.test", "x", files=[f]).insecure is False


def test_policy_env_file_and_dropins(tmp_path: Path) -> None:
    main = conf(tmp_path / "etc" / "registries.conf", """
        [[registry]]
        prefix = "registry.test"
        insecure = true
        [[registry]]
        prefix = "quay.io"
        blocked = true
    """)
    d = tmp_path / "etc" / "registries.conf.d"
    conf(d / "20-b.conf", """
        [[registry]]
        prefix = "registry.test"
        location = "second.test"
    """)
    conf(d / "10-a.conf", """
        [[registry]]
        prefix = "registry.test"
        location = "first.test"
        blocked = true
    """)
    conf(d / "30-ignored.txt", "not toml [")
    env = {"CONTAINERS_REGISTRIES_CONF": str(main), "HOME": str(tmp_path / "home")}
    # the later drop-in replaces the whole table for its prefix
    assert registry_policy("registry.test", "x", env=env) == \
        RegistryPolicy("second.test", False, False, ())
    assert registry_policy("quay.io", "x", env=env).blocked is True


def test_policy_user_file(tmp_path: Path) -> None:
    user = conf(tmp_path / "cfg" / "containers" / "registries.conf", """
        [[registry]]
        prefix = "registry.test"
        blocked = true
    """)
    conf(user.parent / "registries.conf.d" / "x.conf", """
        [[registry]]
        prefix = "other.test"
        insecure = true
    """)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "HOME": str(tmp_path / "home")}
    assert registry_policy("registry.test", "x", env=env).blocked is True
    assert registry_policy("other.test", "x", env=env).insecure is True
    env = {"HOME": str(tmp_path / "home")}
    conf(tmp_path / "home" / ".config" / "containers" / "registries.conf", """
        [[registry]]
        prefix = "home.test"
        blocked = true
    """)
    assert registry_policy("home.test", "x", env=env).blocked is True


def test_policy_missing_file_skipped(tmp_path: Path) -> None:
    assert registry_policy("r.test", "x", files=[tmp_path / "nope.conf"]) == \
        RegistryPolicy("r.test", False, False, ())


@pytest.mark.parametrize("text", [
    "[[registry]\nprefix = 'x'", "registry = 'x'", "[[registry]]\nprefix = 1",
    "[[registry]]\nprefix = 'x'\ninsecure = 'yes'", "[[registry]]\ninsecure = true",
    "[[registry]]\nprefix = 'x'\nmirror = 'y'", "[[registry]]\nprefix = 'x'\n[[registry.mirror]]",
    "[[registry]]\nprefix = 'x'\n[[registry.mirror]]\nlocation = 'm'\ninsecure = 1",
    "[[registry]]\nprefix = '*.x.test'\nlocation = 'y'",
    "[[registry]]\nlocation = 'https://x.test'",
])
def test_policy_malformed(tmp_path: Path, text: str) -> None:
    f = tmp_path / "r.conf"
    f.write_text(text)
    with pytest.raises(RegistryConfigError) as e:
        registry_policy("x", "y", files=[f])
    assert str(f) in one_line(e)


# --- TLS -----------------------------------------------------------------------------------


def make_cert(cn: str) -> tuple[bytes, bytes]:
    """A self-signed CA certificate and its key, PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def ca_names(ctx: Any) -> set[str]:
    return {value for cert in ctx.get_ca_certs() for rdn in cert["subject"]
            for key, value in rdn if key == "commonName"}


def test_ca_files_layout(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for f in [a / "h:5000" / "z.crt", a / "h:5000" / "a.crt", a / "h:5000" / "notes.txt",
              a / "other" / "x.crt", b / "h:5000" / "b.crt", b / "h:5000" / "client.cert",
              b / "h:5000" / "client.key", tmp_path / "c" / "h:5000" / "later.cert",
              tmp_path / "c" / "h:5000" / "later.key"]:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    cas, client = ca_files("h:5000", certs_d=[a, tmp_path / "missing", b, tmp_path / "c"])
    assert cas == [a / "h:5000" / "a.crt", a / "h:5000" / "z.crt", b / "h:5000" / "b.crt"]
    assert client == (b / "h:5000" / "client.cert", b / "h:5000" / "client.key")
    assert ca_files("nothing", certs_d=[a, b]) == ([], None)


@pytest.mark.parametrize("name", ["client.cert", "client.key"])
def test_ca_files_half_a_pair(tmp_path: Path, name: str) -> None:
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / name).write_text("x")
    with pytest.raises(RegistryConfigError) as e:
        ca_files("h", certs_d=[tmp_path])
    assert name in one_line(e)


def test_ssl_context_loads_cas(tmp_path: Path) -> None:
    cert, _ = make_cert("Ember Test CA")
    extra, _ = make_cert("Ember Extra CA")
    d = tmp_path / "certs.d" / "127.0.0.1:5000"
    d.mkdir(parents=True)
    (d / "ca.crt").write_bytes(cert)
    (tmp_path / "extra.pem").write_bytes(extra)
    ctx = ssl_context("127.0.0.1:5000", certs_d=[tmp_path / "certs.d"],
                      ca_cert=tmp_path / "extra.pem")
    assert {"Ember Test CA", "Ember Extra CA"} <= ca_names(ctx)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    other = ssl_context("elsewhere:5000", certs_d=[tmp_path / "certs.d"])
    assert "Ember Test CA" not in ca_names(other)


def test_ssl_context_client_certificate(tmp_path: Path) -> None:
    cert, key = make_cert("client")
    d = tmp_path / "h"
    d.mkdir()
    (d / "client.cert").write_bytes(cert)
    (d / "client.key").write_bytes(key)
    ssl_context("h", certs_d=[tmp_path])
    _, other_key = make_cert("other")
    (d / "client.key").write_bytes(other_key)
    with pytest.raises(RegistryConfigError) as e:
        ssl_context("h", certs_d=[tmp_path])
    assert "client.cert" in one_line(e)


def test_ssl_context_bad_ca(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(RegistryConfigError) as e:
        ssl_context("h", ca_cert=bad, certs_d=[])
    assert str(bad) in one_line(e)
    with pytest.raises(RegistryConfigError):
        ssl_context("h", ca_cert=tmp_path / "missing.pem", certs_d=[])


def test_ssl_context_insecure(tmp_path: Path) -> None:
    ctx = ssl_context("h", insecure=True, certs_d=[])
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname


def test_default_certs_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config._default_certs_dirs() == [tmp_path / ".config" / "containers" / "certs.d",
                                            Path("/etc/containers/certs.d"),
                                            Path("/etc/docker/certs.d")]
