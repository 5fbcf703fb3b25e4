"""The test suite (a package, so that harnesses are imported by name: tests.support.*)."""
