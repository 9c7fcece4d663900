"""cfg-unlearn: unlearn memorised PII with ORPO, conditioning dropout and classifier-free guidance."""

__version__ = "0.1.0"
