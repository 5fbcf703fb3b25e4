"""gRPC service plumbing shared by the services: uvloop, health, reflection,
shutdown, rich errors."""
