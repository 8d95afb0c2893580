"""finesmith: turn a general pre-trained language model into a specialist for one task."""

__version__ = "0.1.0"
