"""gRPC service plumbing shared by fwemu and the driver: uvloop, health, reflection, shutdown, rich errors."""
