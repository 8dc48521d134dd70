"""wsi-fl: federated attention-MIL on whole-slide images."""

__version__ = "0.1.0"
