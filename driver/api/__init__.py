"""The vfio.v1 API: generated code (v1/), plus what server and clients share
beyond the proto: the caller's metadata key, the event payloads (events.py)
and the Write codec (wire.py)."""

# Every call names its client (a Session's owner) with this metadata key.
CLIENT_KEY = "x-vfio-client"
