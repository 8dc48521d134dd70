"""Slide preprocessing: slide access, tissue detection, tiling, encoders, feature extraction, HDF5 format."""
