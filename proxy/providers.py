"""Calls to any LLM provider through litellm: the one module that imports it.

litellm is imported on first use, in a worker thread (the import takes seconds), and set quiet: no telemetry, no
debug banners, and the model cost map read from the package instead of fetched from GitHub at import (set
``LITELLM_LOCAL_MODEL_COST_MAP=False`` to fetch it). Keys and base URLs come from the arguments or, as litellm
reads them, from the provider's environment variables (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``...).
"""

from __future__ import annotations

import asyncio
import os
import threading
from types import ModuleType
from typing import Any

_lock = threading.Lock()
_litellm: ModuleType | None = None


async def complete(
    model: str,
    messages: list[dict[str, Any]],
    *,
    api_base: str | None = None,
    api_key: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """One chat completion from ``model`` (a litellm name, ``provider/model``), as an OpenAI-shaped dict."""
    litellm = _litellm if _litellm is not None else await asyncio.to_thread(_load)
    response = await litellm.acompletion(model=model, messages=messages, api_base=api_base, api_key=api_key, **kwargs)
    return dict(response.model_dump())


def _load() -> ModuleType:
    global _litellm
    with _lock:
        if _litellm is None:
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            import litellm

            litellm.telemetry = False
            litellm.suppress_debug_info = True
            _litellm = litellm
        return _litellm
