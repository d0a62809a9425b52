"""The two pictures of overfitting, built from a study (no TensorFlow).

* **Learning curves**: the training (dashed) and validation loss of the best few completed
  trials, one colour per trial, each trial's best epoch marked. A model that overfits shows
  training loss still falling while validation loss turns up.
* **Knobs**: the validation loss and the generalization gap (val − train at the best epoch)
  of every completed trial against each searched knob, L2 and learning rate on log axes, the
  best trial marked: where regularization starts to help, and where it starts to hurt.

:func:`gather` reads the facts once; :func:`plotly_figures` draws them for optuna-dashboard
and standalone HTML (plotly.js inline: it opens offline), :func:`write_png` with matplotlib's
Agg backend, for a machine without a browser. The words are :mod:`tuner.render`'s.
"""

from __future__ import annotations

import html
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner import attrs, render
from tuner.errors import RuntimeFailure, UserError

if TYPE_CHECKING:
    import plotly.graph_objects as go

DEFAULT_TOP = 5
EXTENSIONS = (".html", ".png")
PNG_SIZE = (1400, 1400)  # pixels
# matplotlib's tab10, which is also plotly's D3 palette: the same trial has the same colour
# in the dashboard, the HTML file and the PNG
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
BEST_COLOR = "#d62728"
DASHBOARD_HEIGHT = 440  # optuna-dashboard draws a saved figure in a box 450 px high


@dataclass(frozen=True)
class Curve:
    """One trial's learning curves (epochs 1..n) and the epoch its model was kept from."""

    trial: int
    value: float
    best_epoch: int | None
    train_loss: list[float]
    val_loss: list[float]


@dataclass(frozen=True)
class Knob:
    """Every completed trial's value of one searched parameter, with its losses."""

    name: str
    log: bool
    values: list[float]
    val_loss: list[float]
    gap: list[float | None]
    trials: list[int]


@dataclass(frozen=True)
class Facts:
    """What both pictures show, read from the study once."""

    study: str
    complete: int
    best_trial: int
    best_value: float
    best_gap: float | None
    curves: list[Curve]
    knobs: list[Knob]


def gather(study: optuna.Study, top: int = DEFAULT_TOP) -> Facts | None:
    """The facts of both pictures, or ``None`` while the study has no completed trial.

    Completed trials only: a pruned trial stopped early, so its losses would be compared with
    finished ones at a different epoch. The curves are of the best ``top`` configurations,
    each by its best run: after ``tuner confirm`` the best trials are often one configuration
    retrained with other seeds.
    """
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value)]
    if not complete:
        return None
    ranked = sorted(complete, key=lambda t: (t.value, t.number))
    best = ranked[0]
    seen: set[tuple[tuple[str, Any], ...]] = set()
    curves = []
    for t in ranked:
        config, curve = tuple(sorted(t.params.items())), _curve(t)
        if curve is not None and config not in seen and len(curves) < top:
            seen.add(config)
            curves.append(curve)
    return Facts(study=study.study_name, complete=len(complete), best_trial=best.number,
                 best_value=float(best.value), best_gap=best.user_attrs.get(attrs.GAP),
                 curves=curves, knobs=_knobs(sorted(complete, key=lambda t: t.number)))


def _curve(t: FrozenTrial) -> Curve | None:
    curve = t.user_attrs.get(attrs.CURVE) or {}
    val, train = curve.get("val_loss") or [], curve.get("train_loss") or []
    if not val:
        return None
    return Curve(trial=t.number, value=float(t.value), best_epoch=t.user_attrs.get(
        attrs.BEST_EPOCH), train_loss=list(train), val_loss=list(val))


def _knobs(trials: list[FrozenTrial]) -> list[Knob]:
    names: dict[str, bool] = {}
    for t in trials:
        for name, dist in t.distributions.items():
            if isinstance(dist, optuna.distributions.FloatDistribution | \
                          optuna.distributions.IntDistribution):
                names.setdefault(name, bool(dist.log))
    order = ("dropout", "l2", "augment", "learning_rate")
    ranked = sorted(names, key=lambda n: (next((i for i, p in enumerate(order)
                                                if n.startswith(p)), len(order)), n))
    knobs = []
    for name in ranked:
        have = [t for t in trials if name in t.params]
        gaps = [t.user_attrs.get(attrs.GAP) for t in have]
        knobs.append(Knob(name=name, log=names[name],
                          values=[_short(float(t.params[name])) for t in have],
                          val_loss=[_short(float(t.value)) for t in have],
                          gap=[None if g is None else _short(float(g)) for g in gaps],
                          trials=[t.number for t in have]))
    return knobs


def _short(value: float) -> float:
    """5 significant digits: a saved figure is rewritten at every update, and 17 digits of
    a dropout rate would double its size for nothing a reader can see."""
    return float(f"{value:.5g}")


def turned_up_at(val_loss: list[float]) -> int | None:
    """The epoch (1-based) after the lowest validation loss, where it turned up; ``None``
    if the lowest is the last epoch (still falling: more epochs might help)."""
    if not val_loss:
        return None
    low = min(val_loss)
    lowest = max(i for i, v in enumerate(val_loss) if v == low)  # a plateau did not turn up
    return lowest + 2 if lowest + 1 < len(val_loss) else None


# --- plotly: the dashboard and the HTML file ---------------------------------------------------


def plotly_figures(facts: Facts) -> tuple[go.Figure, go.Figure]:
    """(learning curves, knobs) as plotly figures, plain lists inside (no binary arrays), so
    any plotly.js reads them, optuna-dashboard's bundled one included."""
    return _curves_plotly(facts), _knobs_plotly(facts)


def _layout(title: str, height: int) -> dict[str, Any]:
    # "plotly_white" would store a 9 kB template in every saved figure
    return {"title": {"text": title, "x": 0.02, "font": {"size": 15}}, "template": "none",
            "height": height, "margin": {"l": 60, "r": 20, "t": 60, "b": 50},
            "legend": {"font": {"size": 11}}, "hovermode": "closest",
            "paper_bgcolor": "white", "plot_bgcolor": "white"}


def _curves_plotly(facts: Facts) -> go.Figure:
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, c in enumerate(facts.curves):
        color = PALETTE[i % len(PALETTE)]
        group = f"trial {c.trial}"
        epochs = list(range(1, len(c.val_loss) + 1))
        fig.add_trace(go.Scatter(x=epochs, y=c.val_loss, mode="lines+markers",
                                 name=render.curve_name(c.trial, "validation"),
                                 legendgroup=group, line={"color": color, "width": 2},
                                 marker={"size": 4}))
        fig.add_trace(go.Scatter(x=epochs[:len(c.train_loss)], y=c.train_loss,
                                 mode="lines", name=render.curve_name(c.trial, "training"),
                                 legendgroup=group,
                                 line={"color": color, "width": 2, "dash": "dash"}))
        if c.best_epoch is not None and 1 <= c.best_epoch <= len(c.val_loss):
            fig.add_trace(go.Scatter(
                x=[c.best_epoch], y=[c.val_loss[c.best_epoch - 1]], mode="markers",
                name=render.best_epoch_name(c.trial), legendgroup=group, showlegend=False,
                marker={"color": color, "size": 13, "symbol": "star",
                        "line": {"color": "black", "width": 1}},
                hovertemplate=render.best_epoch_hover() + "<extra></extra>"))
    fig.update_layout(**_layout(render.curves_title(len(facts.curves)),
                                DASHBOARD_HEIGHT))
    longest = max((len(c.val_loss) for c in facts.curves), default=1)
    fig.update_xaxes(title_text=render.EPOCH_LABEL, showgrid=True, gridcolor="#eee",
                     zeroline=False, tick0=1, dtick=max(1, math.ceil(longest / 10)))
    fig.update_yaxes(title_text=render.LOSS_LABEL, showgrid=True, gridcolor="#eee",
                     zeroline=False)
    return fig


def _knobs_plotly(facts: Facts) -> go.Figure:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = max(1, len(facts.knobs))
    fig = make_subplots(rows=2, cols=n, shared_xaxes="columns", vertical_spacing=0.08,
                        horizontal_spacing=0.06 if n > 1 else 0.0)
    for col, knob in enumerate(facts.knobs, start=1):
        best = [i for i, t in enumerate(knob.trials) if t == facts.best_trial]
        for row, ys in ((1, knob.val_loss), (2, knob.gap)):
            points = [(x, y, t) for x, y, t in zip(knob.values, ys, knob.trials, strict=True)
                      if y is not None]
            fig.add_trace(go.Scatter(
                x=[p[0] for p in points], y=[p[1] for p in points], mode="markers",
                name=render.knob_series(row == 2), showlegend=False,
                marker={"color": PALETTE[0] if row == 1 else PALETTE[1], "size": 7,
                        "opacity": 0.75},
                text=[f"#{p[2]}" for p in points],
                hovertemplate=f"{knob.name} %{{x}}<br>%{{y:.4f}} %{{text}}<extra></extra>"),
                row=row, col=col)
            if best and ys[best[0]] is not None:
                fig.add_trace(go.Scatter(
                    x=[knob.values[best[0]]], y=[ys[best[0]]], mode="markers",
                    name=render.best_trial_name(facts.best_trial), showlegend=False,
                    marker={"color": BEST_COLOR, "size": 14, "symbol": "star",
                            "line": {"color": "black", "width": 1}},
                    hovertemplate=render.best_trial_name(facts.best_trial) +
                    "<extra></extra>"), row=row, col=col)
        scale = {"type": "log", "dtick": 1, "exponentformat": "power"} if knob.log \
            else {"type": "linear"}
        fig.update_xaxes(title_text=knob.name, showgrid=True, gridcolor="#eee", row=2,
                         col=col, **scale)
        fig.update_xaxes(showgrid=True, gridcolor="#eee", row=1, col=col, **scale)
    fig.update_yaxes(showgrid=True, gridcolor="#eee")
    fig.update_yaxes(title_text=render.VAL_LOSS_LABEL, row=1, col=1)
    fig.update_yaxes(title_text=render.GAP_LABEL, zeroline=True, zerolinecolor="#999",
                     row=2, col=1)
    fig.update_layout(**_layout(render.knobs_title(facts.complete), DASHBOARD_HEIGHT))
    return fig


def write(facts: Facts, path: str | os.PathLike[str]) -> Path:
    """Write both pictures to ``path``: ``.html`` (plotly) or ``.png`` (matplotlib)."""
    dest = Path(path)
    suffix = check_extension(dest)
    if suffix == ".html":
        data = html_page(facts).encode("utf-8")
    else:
        data = png_bytes(facts)
    _write_atomically(dest, data)
    return dest


def check_extension(path: Path) -> str:
    """``.html`` or ``.png``, or a one-line :class:`UserError` that says which exist."""
    suffix = path.suffix.lower()
    if path.is_dir():
        raise UserError(f"-o {path} is a folder: give a file name ending in "
                        f"{' or '.join(EXTENSIONS)}")
    if suffix not in EXTENSIONS:
        raise UserError(render.plot_bad_extension(str(path), EXTENSIONS))
    return suffix


def check_writable(path: Path) -> None:
    """Fail before any work if ``path`` cannot be written: a missing folder is the user's
    to fix (exit 2), a folder they may not write to is the environment's (exit 1)."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(render.plot_is_a_folder(str(path)))
    if not folder.is_dir():
        raise UserError(render.plot_no_folder(str(path), str(folder)))
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise RuntimeFailure(render.plot_cannot_write(str(path), "permission denied"))


def _write_atomically(dest: Path, data: bytes) -> None:
    """A reader never sees half a file: write beside it, then rename over it."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent or ".")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise RuntimeFailure(render.plot_cannot_write(str(dest), exc.strerror or str(exc))
                             ) from None


def html_page(facts: Facts) -> str:
    """A standalone page: the summary and both figures, plotly.js inline (no network)."""
    curves, knobs = plotly_figures(facts)
    curves.update_layout(height=520)
    knobs.update_layout(height=640)
    config = {"displaylogo": False, "responsive": True}
    parts = [curves.to_html(full_html=False, include_plotlyjs=True, config=config,
                            div_id="tuner-curves"),
             knobs.to_html(full_html=False, include_plotlyjs=False, config=config,
                           div_id="tuner-knobs")]
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in render.figure_summary(
        facts.study, facts.best_trial, facts.best_value, facts.best_gap, facts.complete))
    title = html.escape(render.plot_page_title(facts.study))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{title}</title><style>body{{font-family:sans-serif;margin:24px;"
            "max-width:1400px}}</style></head><body>"
            f"<h1>{title}</h1><ul>{summary}</ul>{parts[0]}{parts[1]}</body></html>\n")


# --- matplotlib: the PNG -------------------------------------------------------------------------


def png_bytes(facts: Facts) -> bytes:
    """Both pictures in one PNG of :data:`PNG_SIZE` pixels: curves on top, then val_loss and
    the gap against each knob. Agg backend: no display needed."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure  # not pyplot: no global state, nothing to close
    from matplotlib.ticker import MaxNLocator, NullFormatter

    dpi = 100
    n = max(1, len(facts.knobs))
    fig = Figure(figsize=(PNG_SIZE[0] / dpi, PNG_SIZE[1] / dpi), dpi=dpi,
                 layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=(1, 1.5), hspace=0.04)
    ax = top.subplots()
    for i, c in enumerate(facts.curves):
        color = PALETTE[i % len(PALETTE)]
        epochs = list(range(1, len(c.val_loss) + 1))
        ax.plot(epochs, c.val_loss, color=color, marker="o", markersize=3, linewidth=2,
                label=render.curve_name(c.trial, "validation"))
        ax.plot(epochs[:len(c.train_loss)], c.train_loss, color=color, linestyle="--",
                linewidth=2, label=render.curve_name(c.trial, "training"))
        if c.best_epoch is not None and 1 <= c.best_epoch <= len(c.val_loss):
            ax.plot([c.best_epoch], [c.val_loss[c.best_epoch - 1]], marker="*", color=color,
                    markersize=16, markeredgecolor="black", linestyle="none")
    ax.set_title(render.curves_title(len(facts.curves)), loc="left")
    top.suptitle(render.plot_page_title(facts.study), x=0.01, ha="left", fontsize=14)
    ax.set_xlabel(render.EPOCH_LABEL)
    ax.set_ylabel(render.LOSS_LABEL)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, color="#eee")
    if facts.curves:
        ax.legend(fontsize=8, ncol=2, loc="upper right")
    bottom.suptitle(render.knobs_title(facts.complete), x=0.01, ha="left", fontsize=12)
    grid = bottom.subplots(2, n, squeeze=False, sharex="col")
    for col, knob in enumerate(facts.knobs):
        best = [i for i, t in enumerate(knob.trials) if t == facts.best_trial]
        for row, ys, color in ((0, knob.val_loss, PALETTE[0]), (1, knob.gap, PALETTE[1])):
            sub = grid[row][col]
            points = [(x, y) for x, y in zip(knob.values, ys, strict=True) if y is not None]
            sub.scatter([p[0] for p in points], [p[1] for p in points], s=18, color=color,
                        alpha=0.75)
            if best and ys[best[0]] is not None:
                sub.scatter([knob.values[best[0]]], [ys[best[0]]], s=160, marker="*",
                            color=BEST_COLOR, edgecolors="black", zorder=3)
            if knob.log:
                sub.set_xscale("log")
            if row == 1:
                sub.set_xlabel(knob.name)
                sub.axhline(0, color="#999", linewidth=0.8)
            if col == 0:
                sub.set_ylabel(render.VAL_LOSS_LABEL if row == 0 else render.GAP_LABEL)
            sub.grid(True, color="#eee")
            sub.tick_params(labelsize=8)
    for ax in fig.axes:  # a range under a decade gets labelled minor ticks, which overlap
        if ax.get_xscale() == "log":
            ax.xaxis.set_minor_formatter(NullFormatter())
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
