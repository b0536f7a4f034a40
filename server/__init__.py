"""OpenAI-compatible HTTP surface over an `EngineClient` (see server/engine_client.py)."""
