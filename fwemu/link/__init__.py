"""The firmware link: one interface (base), two implementations (inproc, grpc)."""

from .base import FirmwareLink, HostBuffer, LinkError, ScenarioLink

__all__ = ["FirmwareLink", "HostBuffer", "LinkError", "ScenarioLink"]
