"""The generated demo model (tiny_model.py, which needs torch; this package's own import does not)."""

ARCHITECTURES = ("llama", "qwen2", "mistral")
"""Architectures a tiny demo model can be generated in."""
