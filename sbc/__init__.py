"""A topology-hiding session border controller."""

__version__ = "0.1.0"
