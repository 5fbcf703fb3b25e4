"""Hostile clients against the trust boundary (issue 12, "Shown by tests")."""
