"""Named volumes: persistent block devices that outlive machines (``volumes/store.py``)."""

from ember.volumes.store import (
    Volume,
    VolumeError,
    VolumeExists,
    VolumeInUse,
    VolumeMount,
    VolumeNotFound,
    VolumeRequest,
    VolumeStore,
    parse_volume_flag,
)

__all__ = ["Volume", "VolumeError", "VolumeExists", "VolumeInUse", "VolumeMount",
           "VolumeNotFound", "VolumeRequest", "VolumeStore", "parse_volume_flag"]
