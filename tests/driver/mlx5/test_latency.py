"""driver.mlx5.latency: the buckets of vfio_ioctl_seconds and
vfio_reinit_detection_seconds, as Prometheus reads them."""

from __future__ import annotations

from driver.mlx5.latency import BUCKETS, LatencyHistogram


def test_sub_millisecond_ioctls_fall_in_buckets_of_their_own() -> None:
    """An ioctl over the embedded firmware (70-90 us) and one over a fwemu
    process (~0.5 ms) are told apart, not all counted under 0.5 ms."""
    h = LatencyHistogram()
    for seconds in (0.00008, 0.0002, 0.0004, 0.0007, 3.0, 60.0):
        h.observe(seconds)
    assert h.cumulative()[:4] == [("0.0001", 1), ("0.00025", 2), ("0.0005", 3), ("0.001", 4)]
    assert h.cumulative()[-2:] == [("10.0", 5), ("+Inf", 6)]
    assert abs(h.total - 63.00138) < 1e-9


def test_the_buckets_rise_and_their_labels_are_plain_decimals() -> None:
    assert list(BUCKETS) == sorted(set(BUCKETS))
    assert all("e" not in str(b) for b in BUCKETS)  # as Prometheus' own client writes them
