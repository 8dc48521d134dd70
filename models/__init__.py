"""Attention-MIL model family (slide-level heads over patch embeddings)."""
