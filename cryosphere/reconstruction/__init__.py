"""Reconstruction: Fourier-space back-projection, symmetry, FSC (:mod:`.reconstruct`)."""
