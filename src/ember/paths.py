"""Where Ember keeps things: one place for every directory.

* data dir (``EMBER_HOME``, else ``$XDG_DATA_HOME/ember``): the image store and
  machine state directories; a user's own data.
* cache dir (``EMBER_CACHE``, else ``$XDG_CACHE_HOME/ember``): built guest
  artifacts (kernel, agent, initramfs), content-addressed and rebuildable.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    env = os.environ.get("EMBER_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "ember"


def cache_dir() -> Path:
    env = os.environ.get("EMBER_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "ember"


def images_dir() -> Path:
    return data_dir() / "images"


def volumes_dir() -> Path:
    """Named volumes (``ember volume create``): a user's own data."""
    return data_dir() / "volumes"


def machines_dir() -> Path:
    return data_dir() / "machines"


def snapshots_dir() -> Path:
    """User snapshots (``ember snapshot create``): a user's own data."""
    return data_dir() / "snapshots"


def boot_snapshots_dir() -> Path:
    """Boot snapshots (``ember run``'s warm starts): rebuildable, so in the cache."""
    return cache_dir() / "boot-snapshots"
