"""Structured extraction: an unmodified openai-SDK agent reads order sentences into JSON, learning through Lightwire."""
