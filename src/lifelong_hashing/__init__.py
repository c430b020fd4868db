"""lifelong-hashing: deep lifelong cross-modal hashing (image↔text) with frozen database codes."""

__version__ = "0.1.0"
