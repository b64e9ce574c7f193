"""OCI images: import, store, resolve, unpack, and build root file systems.

Only this package knows OCI. The rest of Ember sees :class:`ImageStore`,
:class:`Image`, :class:`ImageConfig` and :func:`resolve_process`.
"""

from ember.images.oci import (
    DEFAULT_PATH,
    ImageConfig,
    ProcessSpec,
    merge_env,
    normalize_tag,
    resolve_process,
)
from ember.images.rootfs import human_size
from ember.images.store import Image, ImageStore, Imported, Layer, Removal, TagMove
from ember.images.unpack import LayerScan, scan_layer, unpack_layer

__all__ = [
    "DEFAULT_PATH",
    "Image",
    "ImageConfig",
    "ImageStore",
    "Imported",
    "Layer",
    "LayerScan",
    "ProcessSpec",
    "Removal",
    "TagMove",
    "human_size",
    "merge_env",
    "normalize_tag",
    "resolve_process",
    "scan_layer",
    "unpack_layer",
]
