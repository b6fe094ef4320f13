"""Other programs' particle files, read as those programs mean them: :mod:`.relion_star`
(RELION 3.0-5 STAR files: project folder, pixel sizes, origins, CTF columns) and
:mod:`.cryosparc` (cryoSPARC ``.cs`` files and their passthrough, converted to RELION's tables)."""
