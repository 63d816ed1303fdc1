"""The vocabulary every room shares: run-config keys, the user-facing error, JSON files."""
