"""Runs: run folders, profiles and notebook execution (:mod:`.execution`), the command line
(:mod:`.cli`), simulate → labels → train in one call (:mod:`.series`) and the image-count
experiment (:mod:`.sweep`).

``cryosphere.runs.<name>`` keeps serving the names of :mod:`.execution` (the former
``cryosphere/runs.py``).
"""

from cryosphere.runs.execution import *  # noqa: F403
from cryosphere.runs.execution import __all__  # noqa: F401
