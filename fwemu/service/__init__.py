"""The gRPC face of the firmware model (fwemu serve)."""
