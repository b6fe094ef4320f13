"""The poster's labels: template banks on the SO(3) grid (:mod:`.templates`), MSE landscapes and
template matching (:mod:`.landscape`), soft maps exp(−λ·MSE)² and top-q masks
(:mod:`.soft_maps`), the λ/q explorer's data (:mod:`.explorer`), labels of a whole dataset with
their cache (:mod:`.dataset_labels`) and the same sharded over ranks (:mod:`.sharded_labels`)."""
