"""The exception tree.

Every error Ember raises on purpose derives from :class:`EmberError`; its
``str()`` is one line fit to show a user. Detail for debugging goes to the log.

    EmberError
     ├── HostError            the host lacks something (tool, permission, KVM)
     ├── BuildError           building a guest artifact (kernel, agent, initramfs) failed
     ├── SubprocessFailed     a host command exited non-zero (carries cmd, code, stderr)
     ├── ImageError           importing, resolving or unpacking an image failed
     │    ├── ImageNotFound   no image matches a reference
     │    ├── AmbiguousImage  an id prefix matches several images
     │    ├── ImageConflict   a removal that needs force (image in use, several tags)
     │    ├── UnsafeLayer     a layer entry is hostile (escapes the root, device node...)
 │    └── RegistryError   a pull failed: registry unreachable, TLS, bad answers
 │         ├── RegistryAuthError   credentials missing or refused
 │         ├── RegistryNotFound    no such repository, tag or manifest
 │         └── NoMatchingPlatform  the image exists, not for the platform asked
     ├── AgentError           the guest agent misbehaved or went away
     │    ├── ProtocolError   a frame was malformed, oversized or unexpected
     │    └── AgentDisconnected
     └── VMMError             the virtual machine monitor failed
          └── MachineCrashed  QEMU died; carries the console's last lines
"""

from __future__ import annotations


class EmberError(Exception):
    """Base of all of Ember's own errors; the message is one user-facing line."""


class HostError(EmberError):
    """The host cannot do what was asked (missing tool, no permission, no KVM)."""


class BuildError(EmberError):
    """Building a guest artifact (kernel, agent, initramfs, rootfs) failed."""


class SubprocessFailed(EmberError):
    """A host command exited with a non-zero status."""

    def __init__(self, cmd: list[str], returncode: int, stderr: str) -> None:
        self.cmd = cmd
        self.returncode = returncode
        self.stderr = stderr
        last = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
        super().__init__(f"{cmd[0]} exited with status {returncode}: {last}")


class ImageError(EmberError):
    """An image could not be imported, resolved or unpacked."""


class ImageNotFound(ImageError):
    """No image in the store matches the reference."""


class AmbiguousImage(ImageError):
    """An image id prefix matches more than one image."""


class ImageConflict(ImageError):
    """A removal refused: a machine uses the image, or an id names several tags."""


class UnsafeLayer(ImageError):
    """A layer holds an entry that would escape the root or is not allowed."""


class RegistryError(ImageError):
    """Pulling from a registry failed (unreachable, TLS, a bad or oversized answer)."""


class RegistryAuthError(RegistryError):
    """The registry wants credentials, or refused the ones given."""


class RegistryNotFound(RegistryError, ImageNotFound):
    """The registry has no such repository, tag or manifest."""


class NoMatchingPlatform(RegistryError):
    """The image has no variant for the platform asked for."""


class AgentError(EmberError):
    """The guest agent misbehaved or could not be reached."""


class ProtocolError(AgentError):
    """A frame on the agent channel was malformed, oversized or unexpected."""


class AgentDisconnected(AgentError):
    """The agent channel closed (the guest powered off or crashed)."""


class VMMError(EmberError):
    """The virtual machine monitor (QEMU) failed."""


class MachineCrashed(VMMError):
    """QEMU exited unexpectedly; ``console_tail`` holds the console's last lines."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        self.console_tail = console_tail
        super().__init__(message)
