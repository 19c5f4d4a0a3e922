"""Agents that use Lightwire without knowing it: each one only reads ``OPENAI_BASE_URL``."""
