"""netshrink: find the best way to compress a neural network for a given budget."""

__version__ = "0.4.0"
