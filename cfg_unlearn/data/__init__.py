"""Data: the pair format, the synthetic PII world and the Lightning data module."""
