"""Imaging: structures and Coulomb-potential maps (:mod:`.structure`), the projector, blur and noise (:mod:`.projection`), simulated particle datasets (:mod:`.simulate`)."""
