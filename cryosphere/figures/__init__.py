"""Figures, the one home for drawing; compute functions elsewhere never draw.

matplotlib: label figures (:mod:`.viz`), evaluation and sweep plots (:mod:`.plots`), maps and
image galleries with the one image orientation (:mod:`.gallery`), FSC and resolution plots
(:mod:`.resolution`), the one Mollweide map (:mod:`.mollweide`). plotly: SO(3) distributions
on the sphere (:mod:`.so3_views` prepares them, :mod:`.so3_plotly` draws them). Files:
:mod:`.export`. ipywidgets explorers: :mod:`.widgets`.
"""
