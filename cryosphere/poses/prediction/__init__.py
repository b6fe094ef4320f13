"""Using a trained network: distributions on any grid level (:mod:`.predictions`),
``cryosphere predict`` on particle STAR files with the optional map search (:mod:`.inference`)
and the same sharded over ranks (:mod:`.sharded_prediction`)."""
