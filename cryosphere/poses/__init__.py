"""Pose estimation. Labels (:mod:`.labels`): template banks (:mod:`.templates`), MSE landscapes
and template matching (:mod:`.landscape`), soft maps and masks (:mod:`.soft_maps`). The
equivariant network (:mod:`.model`): harmonics (:mod:`.harmonics`), layers (:mod:`.layers`),
encoders (:mod:`.encoders`). Training (:mod:`.train`): settings and losses
(:mod:`.training_setup`), checkpoints (:mod:`.checkpoints`), prediction (:mod:`.predictions`).
Metrics and baselines (:mod:`.evaluate`, importing nothing from training) and the equivariance
test (:mod:`.equivariance`)."""
