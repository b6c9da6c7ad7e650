"""Errors shared by every component.

`KdcacheError` is a user-facing error: the CLI prints its message without a traceback. Each names
the file and the problem, so that a user who shares a dataset can tell what is wrong with it.
"""

from __future__ import annotations


class KdcacheError(Exception):
    """An error caused by input, configuration or environment, not by a bug in kdcache."""


class FormatError(KdcacheError):
    """A dataset, manifest or shard does not follow FORMAT.md (corrupt, truncated, mismatched)."""


class TargetValidationError(KdcacheError):
    """Teacher targets handed to the writer are invalid (NaN/inf, ids out of range, wrong k)."""


class ConfigMismatchError(KdcacheError):
    """A run's configuration differs from the one recorded with existing output."""
