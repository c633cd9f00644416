"""Redaction: keep chosen data from ever leaving the host, or from leaving it in clear.

Rules come from ``[[redaction.rules]]``; ``build_redactor`` checks them all at start-up
and ``Redactor.redact`` applies them to each parsed event, in place, before it is
written to the spool.
"""

from sidecar.redaction.detectors import DETECTORS, SECRET_DETECTORS, Detector
from sidecar.redaction.redactor import Hit, Redactor, build_redactor
from sidecar.redaction.rules import RedactionError, Rule

__all__ = [
    "DETECTORS",
    "SECRET_DETECTORS",
    "Detector",
    "Hit",
    "RedactionError",
    "Redactor",
    "Rule",
    "build_redactor",
]
