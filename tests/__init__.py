"""The test suite: one folder per source package (see tests/helpers/ for the shared helpers)."""
