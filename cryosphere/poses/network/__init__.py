"""The equivariant network: SO(3) harmonics and Wigner matrices (:mod:`.harmonics`), the
spherical layers (:mod:`.layers`), image encoders (:mod:`.encoders`), the assembled
:class:`~cryosphere.poses.network.model.PoseDistributionNetwork` (:mod:`.model`) and its
checkpoints and training logs (:mod:`.checkpoints`)."""
