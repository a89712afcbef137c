"""edit2deploy: fix facts inside a local LLM, export it, and verify the edits in the real runtime."""

__version__ = "0.1.0"
