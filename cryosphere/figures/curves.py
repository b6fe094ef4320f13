"""Training curves as one interactive plotly figure (the run report's; notebook 03 draws its own
with matplotlib).

:func:`plot_training_curves` takes each network's ``training_log.csv`` as a table: the
poster's network logs one row per epoch (``epoch``, ``train_loss``, ``val_loss``,
``val_median_deg``…), the streamed network one row per evaluation (``step``…). Both share
the validation median pose error (degrees), the figure's right panel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

__all__ = ["plot_training_curves"]

_X_COLUMNS = ("epoch", "step")


def plot_training_curves(logs: Mapping[str, pd.DataFrame], title: str | None = None) -> go.Figure:
    """Training and validation loss (left) and validation median pose error in degrees (right)
    against each log's epoch or step.

    Args:
        logs: network name -> its ``training_log.csv`` as a DataFrame (an ``epoch`` or
            ``step`` column; any of ``train_loss``, ``val_loss``, ``val_median_deg``).
        title: figure title.

    Returns:
        ``plotly.graph_objects.Figure`` with two panels; one line per network and column.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not logs:
        raise ValueError("logs is empty; give at least one name -> training_log.csv table")
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("loss", "validation median error (°)"),
        horizontal_spacing=0.1,
    )
    for name, log in logs.items():
        x_name = next((c for c in _X_COLUMNS if c in log.columns), None)
        if x_name is None:
            raise ValueError(
                f"the training log of {name!r} has no epoch or step column "
                f"(columns: {list(log.columns)})"
            )
        x = log[x_name].to_numpy()
        for column, dash in (("train_loss", "solid"), ("val_loss", "dot")):
            if column in log.columns:
                fig.add_trace(
                    go.Scatter(
                        x=x,
                        y=log[column].to_numpy(),
                        mode="lines",
                        line={"dash": dash},
                        name=f"{name} {column.replace('_', ' ')} (per {x_name})",
                    ),
                    row=1,
                    col=1,
                )
        if "val_median_deg" in log.columns:
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=log["val_median_deg"].to_numpy(),
                    mode="lines+markers",
                    name=f"{name} median error (per {x_name})",
                ),
                row=1,
                col=2,
            )
    fig.update_xaxes(title_text="epoch or step")
    fig.update_yaxes(title_text="degrees", range=[0, 180], row=1, col=2)
    fig.update_layout(title=title, height=380, margin={"t": 60, "b": 40})
    return fig
