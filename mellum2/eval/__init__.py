"""Evaluations: passkey retrieval and perplexity by position on long repository-level code
(`mellum2 eval`, docs/long_context.md)."""
