"""exprag: retrieval-augmented LLM agents that learn to learn from experience."""

__version__ = "0.1.0"
