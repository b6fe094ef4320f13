"""Searching the map for a particle's pose: exhaustive CTF-aware template matching and the
Fourier spectra it shares (:mod:`.matching`), the search of a few cells with shifts on a
low-pass band and its posterior (:mod:`.local_search`), and the map search behind
``cryosphere predict --map`` (:mod:`.map_search`)."""
