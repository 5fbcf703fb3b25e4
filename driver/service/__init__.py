"""The gRPC face of the VFIO driver (vfio-driver serve)."""
