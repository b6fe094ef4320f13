"""Training the network: targets (:mod:`.targets`), streams of batches (:mod:`.stream`:
simulated from a map, or a fixed set), settings and losses (:mod:`.settings`), the fixed-set
trainer by epochs (:mod:`.fixed_set`), the streamed trainer by steps (:mod:`.streamed`) and its
torch.distributed form (:mod:`.data_parallel`)."""
