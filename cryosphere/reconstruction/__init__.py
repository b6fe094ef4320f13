"""Reconstruction, by concept: Fourier-space back-projection (:mod:`.backprojection`), point-group
symmetry (:mod:`.symmetry`), Fourier shell correlation (:mod:`.fsc`) and resolution experiments
(:mod:`.experiments`)."""
