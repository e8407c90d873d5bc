"""batchd: runs folders of LLM requests as OpenAI-compatible Batch API jobs."""

from __future__ import annotations

__version__ = "0.1.0"
