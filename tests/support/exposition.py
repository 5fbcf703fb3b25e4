"""Reading a Prometheus exposition in tests: samples by name and labels."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# The series a family of each type declares (with or without samples yet).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def samples(exposition: str | CollectorRegistry) -> Samples:
    """{(sample name, sorted labels): value} of an exposition (or of a registry's)."""
    if isinstance(exposition, CollectorRegistry):
        exposition = generate_latest(exposition).decode()
    out = {}
    for fam in text_string_to_metric_families(exposition):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(m: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels (0 when absent)."""
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def value(exposition: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(
        v
        for (n, ls), v in samples(exposition).items()
        if n == name and set(labels.items()) <= set(ls)
    )


def sample_names(exposition: str) -> set[str]:
    return {name for name, _ in samples(exposition)}


def exported_names(exposition: str) -> set[str]:
    """Every series name the exposition declares, with or without samples yet
    (a labelled counter has none until its first increment)."""
    out = set()
    for fam in text_string_to_metric_families(exposition):
        out.update(fam.name + sfx for sfx in SUFFIXES.get(fam.type, ("",)))
        out.update(s.name for s in fam.samples)
    return out
