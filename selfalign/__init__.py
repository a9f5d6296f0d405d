"""selfalign: turn a language model into its own reward-data factory."""

__version__ = "0.1.0"
