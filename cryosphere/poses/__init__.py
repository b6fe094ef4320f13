"""Pose estimation: labels and template matching (:mod:`.labels`), the equivariant network (:mod:`.model`), training and prediction (:mod:`.train`), metrics and baselines (:mod:`.evaluate`)."""
