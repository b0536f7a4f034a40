"""Model loading: local folders, GGUF import, embedded models (see loader.load_model)."""
