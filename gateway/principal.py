"""The verified parties of a call: the officer (principal) and the purpose.

These are frozen values made once at the edge from verified input (a token, an
envelope) and passed through the core; the core never sees raw metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Principal", "Purpose"]


@dataclass(frozen=True)
class Principal:
    """The verified officer on whose behalf a call is made."""

    officer_id: str
    force: str
    units: tuple[str, ...]
    roles: tuple[str, ...]
    clearance: str


@dataclass(frozen=True)
class Purpose:
    """Why the call is made (DPA 2018 s62): justification code, case reference, free text."""

    justification: str
    case_reference: str
    text: str
