"""Editing methods: MEMIT, AlphaEdit, ENCORE and the default (AlphaEdit's null-space solve + MPES)."""

from .editor import METHODS, BatchReport, EditConfig, Editor, MethodSpec

__all__ = ["METHODS", "BatchReport", "EditConfig", "Editor", "MethodSpec"]
