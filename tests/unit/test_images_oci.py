"""OCI formats: config parsing, Docker-style process resolution, manifests and indexes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ember.errors import ImageError
from ember.images import oci
from ember.images.oci import DEFAULT_PATH, ImageConfig, ProcessSpec, resolve_process

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64

# --- ImageConfig ------------------------------------------------------------------------


def test_config_from_json_full() -> None:
    cfg = ImageConfig.from_json({"config": {
        "Env": ["A=1", "PATH=/x"], "Entrypoint": ["/ep"], "Cmd": ["-c", "x"],
        "WorkingDir": "/w", "User": "app", "Labels": {"b": "2", "a": "1"},
        "ExposedPorts": {"80/tcp": {}, "443/tcp": {}}, "StopSignal": "SIGINT",
    }})
    assert cfg == ImageConfig(env=("A=1", "PATH=/x"), entrypoint=("/ep",), cmd=("-c", "x"),
                              working_dir="/w", user="app", labels=(("a", "1"), ("b", "2")),
                              exposed_ports=("443/tcp", "80/tcp"), stop_signal="SIGINT")
    assert cfg.labels_dict == {"a": "1", "b": "2"}


def test_config_from_section_itself() -> None:
    assert ImageConfig.from_json({"Cmd": ["sh"], "User": "app"}) == \
        ImageConfig(cmd=("sh",), user="app")
    assert ImageConfig.from_json({"rootfs": {}, "architecture": "amd64"}) == ImageConfig()


@pytest.mark.parametrize("doc", [{}, {"config": None}, {"config": {}},
                                 {"config": {"Env": None, "Cmd": None, "Labels": None}}])
def test_config_defaults(doc: dict[str, Any]) -> None:
    assert ImageConfig.from_json(doc) == ImageConfig()


@pytest.mark.parametrize("section", [
    {"Env": "A=1"}, {"Env": [1]}, {"Cmd": "sh"}, {"Entrypoint": {"a": 1}},
    {"WorkingDir": 3}, {"User": 0}, {"Labels": ["a"]}, {"Labels": {"a": 1}},
    {"ExposedPorts": ["80"]},
])
def test_config_wrong_types(section: dict[str, Any]) -> None:
    with pytest.raises(ImageError):
        ImageConfig.from_json({"config": section})


@pytest.mark.parametrize("doc", [[], "x", {"config": []}])
def test_config_not_objects(doc: Any) -> None:
    with pytest.raises(ImageError):
        ImageConfig.from_json(doc)


# --- resolve_process ----------------------------------------------------------------------

IMG = ImageConfig(env=("A=1", "PATH=/img/bin"), entrypoint=("/entry", "--flag"),
                  cmd=("default", "args"), working_dir="/srv", user="app")
NOEP = ImageConfig(cmd=("/bin/sh",))
EMPTY = ImageConfig()

RESOLVE_CASES: list[tuple[str, ImageConfig, dict[str, Any], ProcessSpec]] = [
    ("entrypoint+cmd", IMG, {},
     ProcessSpec(("/entry", "--flag", "default", "args"), ("A=1", "PATH=/img/bin"), "/srv",
                 "app")),
    ("command-replaces-cmd-keeps-entrypoint", IMG, {"command": ["x", "y"]},
     ProcessSpec(("/entry", "--flag", "x", "y"), ("A=1", "PATH=/img/bin"), "/srv", "app")),
    ("entrypoint-override-drops-cmd", IMG, {"entrypoint": ["/other"]},
     ProcessSpec(("/other",), ("A=1", "PATH=/img/bin"), "/srv", "app")),
    ("entrypoint-and-command", IMG, {"entrypoint": ["/other"], "command": ["c"]},
     ProcessSpec(("/other", "c"), ("A=1", "PATH=/img/bin"), "/srv", "app")),
    ("empty-entrypoint-clears-it", IMG, {"entrypoint": [], "command": ["/bin/true"]},
     ProcessSpec(("/bin/true",), ("A=1", "PATH=/img/bin"), "/srv", "app")),
    ("cmd-only", NOEP, {},
     ProcessSpec(("/bin/sh",), (f"PATH={DEFAULT_PATH}",), "/", "")),
    ("command-on-cmd-only", NOEP, {"command": ["/bin/echo", "hi"]},
     ProcessSpec(("/bin/echo", "hi"), (f"PATH={DEFAULT_PATH}",), "/", "")),
    ("env-override-in-place-and-append", IMG, {"env": ["A=2", "B=3", "A=4", "EMPTY="]},
     ProcessSpec(("/entry", "--flag", "default", "args"),
                 ("A=4", "PATH=/img/bin", "B=3", "EMPTY="), "/srv", "app")),
    ("env-override-path", NOEP, {"env": ["PATH=/mine"]},
     ProcessSpec(("/bin/sh",), ("PATH=/mine",), "/", "")),
    ("value-with-equals", NOEP, {"env": ["X=a=b"]},
     ProcessSpec(("/bin/sh",), ("X=a=b", f"PATH={DEFAULT_PATH}"), "/", "")),
    ("workdir-and-user-override", IMG, {"workdir": "/tmp", "user": "1000:1000"},
     ProcessSpec(("/entry", "--flag", "default", "args"), ("A=1", "PATH=/img/bin"), "/tmp",
                 "1000:1000")),
    ("user-override-to-root", IMG, {"user": ""},
     ProcessSpec(("/entry", "--flag", "default", "args"), ("A=1", "PATH=/img/bin"), "/srv", "")),
    ("relative-image-workdir-is-rooted", ImageConfig(cmd=("x",), working_dir="app"), {},
     ProcessSpec(("x",), (f"PATH={DEFAULT_PATH}",), "/app", "")),
]


@pytest.mark.parametrize(("config", "kwargs", "expected"),
                         [(c[1], c[2], c[3]) for c in RESOLVE_CASES],
                         ids=[c[0] for c in RESOLVE_CASES])
def test_resolve_process(config: ImageConfig, kwargs: dict[str, Any],
                         expected: ProcessSpec) -> None:
    assert resolve_process(config, **kwargs) == expected


@pytest.mark.parametrize(("config", "kwargs", "message"), [
    (EMPTY, {}, "image has no command: give one after --"),
    (IMG, {"entrypoint": [], "command": []}, "no command"),
    (NOEP, {"command": []}, "no command"),
    (NOEP, {"workdir": "rel"}, "absolute"),
    (NOEP, {"env": ["NOVALUE"]}, "KEY=VALUE"),
    (NOEP, {"env": ["=x"]}, "KEY=VALUE"),
])
def test_resolve_process_errors(config: ImageConfig, kwargs: dict[str, Any],
                                message: str) -> None:
    with pytest.raises(ImageError, match=message):
        resolve_process(config, **kwargs)


# --- manifests, indexes, configs -------------------------------------------------------------


def manifest(media_type: str | None = oci.OCI_MANIFEST,
             layer_type: str = oci.OCI_LAYER_GZIP, config_type: str = oci.OCI_CONFIG) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "config": {"mediaType": config_type, "digest": D1, "size": 10},
        "layers": [{"mediaType": layer_type, "digest": D2, "size": 20}],
    }
    if media_type is not None:
        doc["mediaType"] = media_type
    return json.dumps(doc).encode()


@pytest.mark.parametrize("layer_type", [oci.OCI_LAYER_TAR, oci.OCI_LAYER_GZIP,
                                        oci.DOCKER_LAYER_GZIP])
def test_parse_manifest_layer_types(layer_type: str) -> None:
    m = oci.parse_manifest(manifest(layer_type=layer_type))
    assert m.config.digest == D1 and m.layers[0].media_type == layer_type
    assert m.layers[0].size == 20


def test_parse_docker_manifest_and_missing_media_type() -> None:
    m = oci.parse_manifest(manifest(oci.DOCKER_MANIFEST, oci.DOCKER_LAYER_GZIP,
                                    oci.DOCKER_CONFIG))
    assert m.media_type == oci.DOCKER_MANIFEST
    assert oci.parse_manifest(manifest(None)).media_type == oci.OCI_MANIFEST


@pytest.mark.parametrize(("data", "message"), [
    (manifest("application/vnd.docker.distribution.manifest.v1+json"),
     "unsupported manifest media type 'application/vnd.docker.distribution.manifest.v1"),
    (manifest(layer_type="application/vnd.oci.image.layer.v1.tar+bzip2"),
     "unsupported layer media type 'application/vnd.oci.image.layer.v1.tar\\+bzip2'"),
    (manifest(layer_type="application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"),
     "unsupported layer media type"),
    (manifest(config_type="application/json"), "unsupported image config media type"),
    (b"{not json", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (json.dumps({"schemaVersion": 1, "layers": []}).encode(), "schemaVersion"),
    (manifest().replace(D2.encode(), b"md5:abc"), "unsupported digest algorithm"),
    (manifest().replace(D2.encode(), b"sha256:XYZ"), "invalid"),
    (manifest().replace(b'"size": 20', b'"size": -1'), "invalid size"),
])
def test_parse_manifest_errors(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        oci.parse_manifest(data)


def test_zstd_layers_follow_decompressor_availability() -> None:
    data = manifest(layer_type=oci.OCI_LAYER_ZSTD)
    if oci.zstd_available():
        assert oci.parse_manifest(data).layers[0].media_type == oci.OCI_LAYER_ZSTD
    else:
        with pytest.raises(ImageError, match="unsupported layer media type"):
            oci.parse_manifest(data)


def entry(digest: str, os_: str | None = None, arch: str | None = None,
          media_type: str = oci.OCI_MANIFEST) -> dict[str, Any]:
    e: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": 5}
    if os_ is not None:
        e["platform"] = {"os": os_, "architecture": arch}
    return e


def index(*entries: dict[str, Any], media_type: str = oci.OCI_INDEX) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": media_type,
                       "manifests": list(entries)}).encode()


def test_select_linux_amd64() -> None:
    entries = oci.parse_index(index(entry(D1, "linux", "arm64"), entry(D2, "linux", "amd64"),
                                    entry(D3, "unknown", "unknown")))
    assert oci.select_manifest(entries).digest == D2
    lst = oci.parse_index(index(entry(D1, "linux", "amd64", oci.DOCKER_MANIFEST),
                                media_type=oci.DOCKER_MANIFEST_LIST))
    assert oci.select_manifest(lst).digest == D1


def test_select_single_entry_without_platform() -> None:
    assert oci.select_manifest(oci.parse_index(index(entry(D1)))).digest == D1


@pytest.mark.parametrize(("data", "message"), [
    (index(entry(D1, "linux", "arm64"), entry(D2, "linux", "s390x")), "no linux/amd64"),
    (index(entry(D1), entry(D2)), "holds 2 images"),
    (index(), "no image manifest"),
    (index(entry(D1, media_type="application/vnd.in-toto+json")), "no image manifest"),
])
def test_select_errors(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        oci.select_manifest(oci.parse_index(data))


def test_parse_index_wrong_media_type() -> None:
    with pytest.raises(ImageError, match="unsupported index media type 'text/plain'"):
        oci.parse_index(index(media_type="text/plain"))


def config_doc(**over: Any) -> bytes:
    doc: dict[str, Any] = {"architecture": "amd64", "os": "linux",
                           "created": "2024-01-01T00:00:00Z",
                           "config": {"Cmd": ["sh"]},
                           "rootfs": {"type": "layers", "diff_ids": [D1, D2]}}
    doc.update(over)
    return json.dumps(doc).encode()


def test_parse_config() -> None:
    info = oci.parse_config(config_doc())
    assert info.diff_ids == (D1, D2) and info.config.cmd == ("sh",)
    assert info.created == "2024-01-01T00:00:00Z"


@pytest.mark.parametrize(("over", "message"), [
    ({"architecture": "arm64"}, "image is for linux/arm64"),
    ({"os": "windows"}, "windows"),
    ({"rootfs": None}, "rootfs"),
    ({"rootfs": {"type": "layers"}}, "diff_ids"),
    ({"rootfs": {"type": "layers", "diff_ids": ["nope"]}}, "invalid diff_id"),
    ({"config": {"Env": 5}}, "Env"),
])
def test_parse_config_errors(over: dict[str, Any], message: str) -> None:
    with pytest.raises(ImageError, match=message):
        oci.parse_config(config_doc(**over))


def test_merge_env_keeps_image_entries_without_equals() -> None:
    assert oci.merge_env(["WEIRD", "A=1"], ["A=2"]) == ("WEIRD", "A=2", f"PATH={DEFAULT_PATH}")
