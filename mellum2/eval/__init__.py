"""Evaluations: passkey retrieval, perplexity by position (more to come: HumanEval, bits per byte, FIM)."""
