"""Clients of the vfio-driver service: a library that reads like ioctl code."""

from .client import Device, FeatureResult, PrecopyInfo, VfioClient, VfioClientError, read_all

__all__ = ["Device", "FeatureResult", "PrecopyInfo", "VfioClient", "VfioClientError", "read_all"]
