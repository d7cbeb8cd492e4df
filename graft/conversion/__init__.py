"""Conversion between checkpoint formats: graft's readers, a bounded stream, one writer per target."""

from graft.conversion.api import TARGETS, convert
from graft.conversion.report import ConvertReport

__all__ = ["convert", "ConvertReport", "TARGETS"]
