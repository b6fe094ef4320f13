"""Training the network: targets (:mod:`.targets`), streams of batches (:mod:`.stream`:
simulated from a map, or a fixed set), settings and losses (:mod:`.settings`), the one trainer,
by steps on any stream (:mod:`.streamed`), run by epochs on a fixed set of images and targets
(:mod:`.fixed_set`, the poster's setting) and in a torch.distributed form
(:mod:`.data_parallel`)."""
