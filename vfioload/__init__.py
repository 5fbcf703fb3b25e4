"""vfio-loadtest: load tests of the REINIT paths on Locust (vfioload/locustfile.py)."""
