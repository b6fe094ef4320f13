"""SO(3) distributions on spheres: one import for the sphere views, kept as in release 0.1.

The names live, since 0.2, in modules by job; this module re-exports them all:

* :mod:`cryosphere.figures.so3_views`: what a view draws (:class:`SphereView`,
  :func:`sphere_view`, :class:`DistributionSet`), in-plane angles and their cyclic colours,
  :func:`lon_lat_deg`, the latitude-longitude pixel mesh, and the conventions;
* :mod:`cryosphere.figures.so3_plotly`: the interactive 3D views (:func:`plot_viewing_sphere`,
  :func:`plot_pose_scatter`, :func:`plot_label_vs_prediction`);
* :mod:`cryosphere.figures.mollweide`: the static Mollweide maps (:func:`plot_mollweide`);
* :mod:`cryosphere.figures.export`: files (:func:`save_figure`, :func:`export_html`,
  :func:`export_png`, :func:`png_export_problem`) and :func:`plotly_mimebundle`.
"""

from __future__ import annotations

from cryosphere.figures import export, so3_plotly, so3_views
from cryosphere.figures.export import *  # noqa: F403  (the 0.1 names, re-exported)
from cryosphere.figures.mollweide import plot_mollweide
from cryosphere.figures.so3_plotly import *  # noqa: F403
from cryosphere.figures.so3_views import *  # noqa: F403

# Every public name of the homes above (plus plot_mollweide): the 0.1 names and cyclic_colorscale.
__all__ = [*so3_views.__all__, *so3_plotly.__all__, "plot_mollweide", *export.__all__]
