"""Snapshots of machines, and clones started from them.

``manifest.py`` (the validated record), ``store.py`` (immutable directories,
in-use locks, eviction), ``compat.py`` (what a snapshot is tied to on this
host), ``take.py`` (capture, then commit), ``boot.py`` (``ember run``'s
warm starts from per-shape boot snapshots). QEMU's side is ``vmm/snapshot.py``.
"""
