"""The embedded fact-world model: a synthetic corpus and the small model trained on it."""
