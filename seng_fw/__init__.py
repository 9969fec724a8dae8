"""seng-fw: per-application network gateway for SGX enclaves (SENG re-implementation)."""

__version__ = "0.1.0"
