"""Exception hierarchy shared by every gradstore package.

Each exception also subclasses the closest built-in, so callers can catch either
``GradstoreError`` or the familiar ``ValueError`` / ``FileNotFoundError``.
"""

from __future__ import annotations


class GradstoreError(Exception):
    """Base class of every error gradstore raises on purpose."""


class ProjectionSpecError(GradstoreError, ValueError):
    """A projection spec is malformed, or asks for something the math cannot do."""


class ProjectionMismatchError(GradstoreError, ValueError):
    """Two projections that must be identical are not (different spec or rebuilt matrices)."""
