"""The vocabulary every package shares; it imports nothing of ours."""
