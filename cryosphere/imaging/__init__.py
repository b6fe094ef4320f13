"""Imaging: structures in (:mod:`.atoms`), point groups from chains (:mod:`.chain_symmetry`),
Coulomb-potential maps (:mod:`.structure`), the projector, blur
and noise (:mod:`.projection`), CTFs (:mod:`.ctf`), simulated particle datasets
(:mod:`.datasets`, made by :mod:`.simulate`), real particles (:mod:`.particles`,
:mod:`.preprocess`)."""
