"""Runs: the run configuration (:mod:`.run_config`: ``RunConfig``, profiles) and the pipeline
(:mod:`.pipeline`: ``Run``, its stages and the one cache rule), the stages' result types
(:mod:`.series`), the SNR study (:mod:`.snr_study`) and the image-count experiment
(:mod:`.sweep`), training on a refinement (:mod:`.refinement`), papermill execution of the
series (:mod:`.execution`) and the command line (:mod:`.cli`)."""
