"""Evaluation reports and the architecture x transform sweep.

:func:`evaluate` writes ``report.md`` with PNG figures and ``metrics.json``
into a directory. For a regressor: the MSE of the transformed targets and of
the counts, Spearman and Pearson correlations of predicted and real counts
(and, for simulated data, of the ground-truth expected counts), a scatter
plot of real against predicted counts with the x = y line, and galleries of
the highest- and lowest-predicted crops and of the worst errors, with the
beam marked. For the classifier: accuracy, balanced accuracy, the confusion
matrix and galleries of the misclassified crops. Correlations and accuracies
come with a 95 % interval from resampling the subset's crystals
(:func:`crystal_interval`). For both, a table of the
collections (scan ids) that make most of the error: figures over a whole
subset hide that one collection, a rotation centred on a crystal's edge or a
loop seen edge-on, can make most of it, and site data come by collection.

:func:`sweep` trains every architecture with every label transform on one
split and writes the thesis' Table 2.3 layout (test MSE per architecture
and transform), plus the Spearman correlations, which unlike the MSE of
different transforms can be compared across columns.
"""

from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mxcube_autocenter.labelling.dataset import DatasetError, RowReader, raised_inside_tensorflow, read_table  # noqa: E402
from mxcube_autocenter.learning import crops  # noqa: E402
from mxcube_autocenter.learning.data import check_crop_fits, row_crop  # noqa: E402
from mxcube_autocenter.learning.split import SUBSETS, Split  # noqa: E402
from mxcube_autocenter.learning.training import (  # noqa: E402
    COUNT_LABELS,
    DEFAULT_LABEL,
    classifier_metrics,
    expected_count_metrics,
    info_spec,
    info_transform,
    label_counts,
    load_model,
    predict_rows,
    regression_metrics,
    train,
)
from mxcube_autocenter.learning.transforms import TRANSFORMS  # noqa: E402
from mxcube_autocenter.outputs import check_creatable, save_figure_whole, write_json_whole, write_text_whole  # noqa: E402
from mxcube_autocenter.scorecard import format_cell, value_cell  # noqa: E402

log = logging.getLogger(__name__)

# Every figure a report may draw; a report removes those of them it does not draw (see evaluate).
REPORT_FIGURES = ("scatter.png", "gallery_highest.png", "gallery_lowest.png", "gallery_worst.png", "heatmaps.png",
                  "confusion.png", "gallery_misclassified.png")

_INTERVALS = ("In brackets: the 95 % interval from resampling the subset's {n} crystals (crystal bootstrap): how far "
              "another draw of crystals could move the figure.")


def interval_note(crystal_ids, *intervals) -> list:
    """The report's lines after a metrics table: a blank line, and the note on the brackets where there are any.

    The blank line ends the Markdown table (a line right after it would be read as one more row); a subset
    of one crystal has no interval (:func:`crystal_interval` gives None), so no figure is in brackets.
    """
    if all(interval is None for interval in intervals):
        return [""]
    return ["", _INTERVALS.format(n=len(set(crystal_ids))), ""]


def crystal_interval(crystal_ids, statistic, *, level=0.95, n_resamples=1000, seed=0):
    """Bootstrap interval of ``statistic`` over crystals: whole crystals resampled with replacement.

    The rows of one crystal are not independent (its scans share its shape
    and quality), so the interval resamples crystals, not rows: with the few
    test crystals of a small set it is wide, as it should be.

    Parameters
    ----------
    crystal_ids : (N,) array_like
        The crystal of each row.
    statistic : callable
        ``statistic(rows) -> float or None`` of an index array into
        ``crystal_ids`` (a crystal drawn twice gives its rows twice).
    level : float
        Coverage of the interval.
    n_resamples : int
    seed : int

    Returns
    -------
    tuple of float or None
        ``(low, high)``; None with fewer than two crystals, or when the
        statistic is undefined in half the resamples or more.
    """
    _, inverse = np.unique(np.asarray(crystal_ids).astype(str), return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(inverse.max(initial=-1) + 1)]
    if len(members) < 2:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        value = statistic(np.concatenate([members[k] for k in rng.integers(len(members), size=len(members))]))
        if value is not None and np.isfinite(value):
            values.append(value)
    if len(values) * 2 <= n_resamples:
        return None
    tail = 50 * (1 - level)
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _rows_for(info, table, subset, model_path):
    if len(table) == 0:
        raise ValueError(f"{table.path}: the dataset has no rows: label recordings into it first")
    if subset == "all":
        return np.arange(len(table))
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS} or 'all', not {subset!r}")
    split = Split.from_config(info["split"])
    rows = split.indices(table.crystal_id)[subset]
    if len(rows) == 0:
        raise ValueError(
            f"{table.path}: none of the {len(getattr(split, subset))} {subset} crystals of {model_path} "
            "is in this dataset: evaluate on a dataset with them, or a separate test set with --subset all "
            "(subset='all')"
        )
    return rows


def _gallery(path, table, rows, spec, captions, title, columns=6):
    """A figure of the crops of ``rows`` with the beam (crop centre) marked and a caption each."""
    rows = list(rows)
    if not rows:
        return None
    n_rows = int(np.ceil(len(rows) / columns))
    fig, axes = plt.subplots(n_rows, columns, figsize=(2.0 * columns, 2.25 * n_rows + 0.4), squeeze=False)
    with RowReader(table.path, table.image_dataset) as reader:
        for ax, i, caption in zip(axes.flat, rows, captions):
            crop, _ = row_crop(reader, table, int(i), spec)
            ax.imshow(crop[..., 0] if crop.shape[-1] == 1 else crop, cmap="gray" if crop.shape[-1] == 1 else None)
            # The beam at the crop's point (pixel centres at integers, as imshow draws them).
            c = crops.crop_middle(spec.input_size)
            ax.plot([c], [c], marker="+", color="red", markersize=14, mew=1.5)
            ax.set_title(caption, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure_whole(fig, path, dpi=80)
    plt.close(fig)
    return os.path.basename(path)


def _heatmaps(path, model, spec, table, rows, score, to_counts, *, crystals=4, grid=15, top=3):
    """Prediction heatmaps over the stored images of held-out crystals, their ``top`` best points marked.

    One image per crystal (of the first ``crystals`` in ``rows``): its row of the highest ``score``. The
    model is run on the crop centred on each point of a ``grid`` x ``grid`` lattice over the stored image,
    as far as whole crops fit (the stored crop must be larger than the model's), crop by crop, so any
    architecture works. ``to_counts`` maps the model's outputs to what the heatmap shows.
    """
    from mxcube_autocenter.centring.heatmap import prepare_region, reference_heatmap
    from mxcube_autocenter.centring.loop import Roi

    chosen = []
    for crystal in dict.fromkeys(table.crystal_id[rows]):
        mine = np.flatnonzero(table.crystal_id[rows] == crystal)
        chosen.append(int(mine[np.argmax(score[mine])]))
        if len(chosen) == crystals:
            break
    panels = []
    with RowReader(table.path, table.image_dataset) as reader:
        for j in chosen:
            i = int(rows[j])
            image = reader.image(i)
            crop_w, crop_h = crops.crop_side_px(spec.crop_um, table.pixels_per_mm[i])
            roi = Roi(int(np.ceil(crop_w / 2)), int(np.ceil(crop_h / 2)), int(image.shape[1] - crop_w / 2),
                      int(image.shape[0] - crop_h / 2))  # fmt: skip
            if roi.width <= 0 or roi.height <= 0:
                return None  # the stored crops are no larger than the model's: no room for a heatmap
            region, origin, scale = prepare_region(image, roi, (crop_w, crop_h), spec.input_size,
                                                   crops.region_normaliser(spec))
            xs, ys = np.linspace(roi.x0, roi.x1, grid), np.linspace(roi.y0, roi.y1, grid)
            heatmap = reference_heatmap(model, region, origin, scale, spec.input_size, xs, ys)
            panels.append((i, image, heatmap, np.asarray(to_counts(heatmap.values), dtype=np.float64)))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (i, image, heatmap, values) in zip(axes.flat, panels):
        ax.imshow(image)
        # Each cell centred on its grid point: the grid's step is the panel's own (rows of other zooms store
        # images of other sizes, so their grids have other steps).
        half_x, half_y = (heatmap.xs[1] - heatmap.xs[0]) / 2, (heatmap.ys[1] - heatmap.ys[0]) / 2
        extent = (heatmap.xs[0] - half_x, heatmap.xs[-1] + half_x, heatmap.ys[-1] + half_y, heatmap.ys[0] - half_y)
        ax.imshow(values, extent=extent, cmap="inferno", alpha=0.55, interpolation="bilinear")
        best = np.argsort(values, axis=None)[::-1][:top]
        for rank, flat in enumerate(best, start=1):
            r, c = np.unravel_index(flat, values.shape)
            ax.plot(heatmap.xs[c], heatmap.ys[r], "o", mfc="none", mec="lime", ms=10, mew=1.5)
            ax.annotate(str(rank), (heatmap.xs[c], heatmap.ys[r]), color="lime", fontsize=8, xytext=(6, 6),
                        textcoords="offset points")
        ax.plot(*table.beam_xy[i], marker="+", color="red", markersize=14, mew=1.5)
        ax.set_title(f"{table.crystal_id[i]}: rc {table.rc[i]:.0f}, max {values.max():.1f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"predictions over the stored image ({spec.crop_um:g} um crops; top {top}: green; beam: red cross)",
                 fontsize=9)
    fig.tight_layout()
    save_figure_whole(fig, path, dpi=80)
    plt.close(fig)
    return os.path.basename(path)


def _scatter(path, real, pred, title):
    fig, ax = plt.subplots(figsize=(5, 5))
    real = np.asarray(real, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    ax.scatter(real, pred, s=6, alpha=0.5)
    # Both axes share one range, so that x = y is the diagonal; it takes in every finite point: a vanilla or tanh
    # model predicts negative counts (and log ones down to -1), which a fixed lower limit would hide.
    finite = np.concatenate([real[np.isfinite(real)], pred[np.isfinite(pred)]])
    top = max(float(finite.max()) if finite.size else 1.0, 1.0)
    low = min(float(finite.min()) if finite.size else 0.0, 0.0)
    ax.plot([low, top], [low, top], color="red", lw=1, label="x = y")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("symlog", linthresh=1)
    limits = (low * 1.3 - 0.5, top * 1.3)
    ax.set_xlim(*limits)
    ax.set_ylim(*limits)
    ax.set_xlabel("real reflection count")
    ax.set_ylabel("predicted reflection count")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left")
    fig.tight_layout()
    save_figure_whole(fig, path, dpi=100)
    plt.close(fig)
    return os.path.basename(path)


def _confusion(path, confusion, real: str, classes):
    fig, ax = plt.subplots(figsize=(4, 3.6))
    m = np.asarray(confusion)
    ax.imshow(m, cmap="Blues")
    for (r, c), v in np.ndenumerate(m):
        ax.text(c, r, str(v), ha="center", va="center", color="black", fontsize=12)
    ax.set_xticks([0, 1], list(classes))
    ax.set_yticks([0, 1], list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel(f"real ({real})")
    fig.tight_layout()
    save_figure_whole(fig, path, dpi=100)
    plt.close(fig)
    return os.path.basename(path)


def collection_shares(scan_ids, loss) -> list[tuple[str, np.ndarray, float]]:
    """Each collection's rows and share of the total loss, largest share first.

    Parameters
    ----------
    scan_ids : (N,) array of str
        The collection (scan id) of each evaluated row.
    loss : (N,) array of float
        Each row's loss: 1 for a misclassified crop, the squared error of a
        regressor's transformed target.

    Returns
    -------
    list of (scan_id, indices into the N rows, share)
        ``share`` is the collection's part of the summed loss (0 for every
        collection when there is no loss); ties keep the order of first
        appearance.
    """
    scan_ids = np.asarray(scan_ids)
    loss = np.asarray(loss, dtype=np.float64)
    total = float(loss.sum())
    _, first = np.unique(scan_ids, return_index=True)
    groups = []
    for scan in scan_ids[np.sort(first)]:
        members = np.flatnonzero(scan_ids == scan)
        groups.append((str(scan), members, float(loss[members].sum()) / total if total > 0 else 0.0))
    return sorted(groups, key=lambda group: -group[2])


def _collection_table(table, rows, groups, columns, limit):
    """Markdown lines and JSON records of the collections: ``columns`` maps a key to ``(f(indices), digits)``."""
    records = []
    for scan, members, share in groups:
        first = rows[members[0]]
        record = {"scan_id": scan, "scan_type": str(table.scan_type[first]), "crystal_id": str(table.crystal_id[first]),
                  "crops": int(len(members)), "share_of_error": share}
        record.update({name: f(members) for name, (f, _) in columns.items()})
        records.append(record)
    formats = {"crops": "{:d}", **{name: f"{{:.{d}f}}" for name, (_, d) in columns.items()}}
    keys = ["scan_id", "scan_type", "crystal_id", "crops", *columns, "share_of_error"]
    lines = [f"## error by collection (the {min(limit, len(records))} of {len(records)} with the largest share)", "",
             "| " + " | ".join(k.replace("_", " ") for k in keys) + " |", "|" + "---|" * len(keys)]
    for record in records[:limit]:
        lines.append("| " + " | ".join(format_cell(record[k], formats.get(k, "{:.3f}")) for k in keys) + " |")
    return lines + [""], records


def _learnt_counts(info, table, dataset_path) -> tuple:
    """``(label, counts)`` of the rows as a regressor learnt them (``label_counts``, checked); a classifier's: None."""
    if info["task"] != "regression":
        return None, None
    label = info.get("label", DEFAULT_LABEL)
    if label != "rc" and label not in table.extra:
        # A model that learnt the simulator's expected counts (the shipped one) on a beamline's own set: the
        # recorded counts are all it has.
        label = "rc"
    return label, label_counts(table, label, dataset_path)


def evaluate(model_path, dataset_path, out_dir, *, subset: str = "test", gallery: int = 12, batch_size: int = 64,
             collections: int = 10) -> dict:
    """Evaluate a model file on a dataset and write ``report.md``, figures and ``metrics.json``.

    Parameters
    ----------
    model_path : str
        A ``.keras`` file from :func:`training.train` or :func:`training.train_classifier`.
    dataset_path : str
    out_dir : str
    subset : {"test", "validation", "train", "all"}
        Rows of the model's stored split (by crystal id), or every row (a
        separate test dataset).
    gallery : int
        Crops per gallery.
    collections : int
        Collections listed in the report's error table (``metrics.json``
        lists all).

    Returns
    -------
    dict
        The metrics (also in ``metrics.json``).

    Notes
    -----
    Figures of an earlier report in ``out_dir`` (:data:`REPORT_FIGURES`) that
    this one does not draw are removed, so that the directory holds only this
    model's.
    """
    model, info = load_model(model_path)
    spec = info_spec(info)
    table = read_table(dataset_path)
    rows = _rows_for(info, table, subset, model_path)
    check_crop_fits(table, spec, model_path, f"evaluate it on a set stored with at least {spec.crop_um:g} um")
    label, learnt_counts = _learnt_counts(info, table, dataset_path)
    with RowReader(table.path, table.image_dataset) as reader:
        reader.check(rows)
    # Only once the inputs are good: a refused run leaves no empty report directory behind.
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the report directory {out_dir} ({err}): choose another --out") from err
    print(f"evaluating {model_path} on {len(rows)} rows ({subset}) of {dataset_path}")
    trained_on = sorted(Split.from_config(info["split"]).trained_on())
    seen = int(np.isin(table.crystal_id[rows].astype(str), np.asarray(trained_on, dtype=str)).sum()) if trained_on else 0
    if seen and subset != "train":
        log.warning(
            "%s: %d of the %d rows evaluated (%s) are of crystals %s was trained on: their figures read too high; "
            "evaluate the test subset (--subset test) or a set of other crystals", dataset_path, seen, len(rows), subset,
            model_path)
    raw = predict_rows(model, table, rows, spec, batch_size=batch_size)
    rc = table.rc[rows]
    crystals = table.crystal_id[rows].astype(str)
    arch = info["architecture"]["name"]
    lines = [f"# Evaluation of `{os.path.basename(model_path)}`", "",
             f"- model: `{os.path.abspath(model_path)}` ({arch}, {info['architecture'].get('params')} parameters, "
             f"{info['task']})",
             f"- dataset: `{os.path.abspath(dataset_path)}`, {subset} subset: {len(rows)} crops, "
             f"{len(set(table.crystal_id[rows]))} crystals",
             f"- input: {spec.crop_um:g} um crops at {spec.input_size} x {spec.input_size} {spec.colour}, "
             f"{spec.normalisation} normalisation", ""]
    if seen and subset != "train":
        # Said in the report too, not only in a log its reader never sees.
        lines[-1:-1] = [f"- **{seen} of these {len(rows)} crops are of crystals the model was trained on**: their "
                        "figures read too high (evaluate the test subset, or a set of other crystals)"]
    figures = {}
    if info["task"] == "regression":
        transform = info_transform(info)
        pred = transform.inverse(raw)
        # The MSE against the targets the model learnt (see training.LABELS), the correlations against the
        # recorded counts (and the expected ones where the dataset has them).
        learnt = learnt_counts[rows]
        metrics = regression_metrics(rc, pred, transform.forward(learnt), raw)
        metrics.update(expected_count_metrics(table, rows, pred))
        metrics.update(subset=subset, transform=transform.name, mse_against=label)
        metrics["spearman_ci95"] = crystal_interval(crystals, lambda r: regression_metrics(rc[r], pred[r])["spearman"])
        if "spearman_expected" in metrics:
            metrics["spearman_expected_ci95"] = crystal_interval(
                crystals, lambda r: expected_count_metrics(table, rows[r], pred[r])["spearman_expected"])
        lines += ["| metric | value |", "|---|---|",
                  f"| MSE ({transform.name} targets, against the {label} counts the model learnt) | "
                  f"{format_cell(metrics['mse'], '{:.4f}')} |",
                  f"| MSE (counts, against the recorded rc) | {format_cell(metrics['mse_counts'], '{:.1f}')} |",
                  f"| Spearman (real vs predicted counts) | "
                  f"{value_cell(metrics['spearman'], metrics['spearman_ci95'], '{:.3f}')} |",
                  f"| Pearson (real vs predicted counts) | {format_cell(metrics['pearson'], '{:.3f}')} |"]
        if "spearman_expected" in metrics:
            spearman = value_cell(metrics["spearman_expected"], metrics["spearman_expected_ci95"], "{:.3f}")
            lines.append(f"| Spearman (expected vs predicted counts) | {spearman} |")
        lines += interval_note(crystals, metrics["spearman_ci95"], metrics.get("spearman_expected_ci95"))
        figures["scatter"] = _scatter(os.path.join(out_dir, "scatter.png"), rc, pred,
                                      f"{arch}, {transform.name}: Spearman {format_cell(metrics['spearman'], '{:.3f}')}")
        order = np.argsort(pred)
        k = min(gallery, len(rows))
        error = np.abs(raw - transform.forward(learnt))
        collection_lines, collection_records = _collection_table(table, rows, collection_shares(
            table.scan_id[rows], error ** 2), {
            "median_real_count": (lambda m: float(np.median(rc[m])), 1),
            "median_predicted_count": (lambda m: float(np.median(pred[m])), 1),
            "spearman": (lambda m: regression_metrics(rc[m], pred[m])["spearman"], 3),
            "mse": (lambda m: float(np.mean(error[m] ** 2)), 4),
        }, collections)
        worst = np.argsort(error)[::-1][:k]
        for name, sel, title in (
            ("highest", order[::-1][:k], "highest predicted counts"),
            ("lowest", order[:k], "lowest predicted counts"),
            ("worst", worst, f"worst errors ({transform.name} targets of {label})"),
        ):
            # The worst errors are against the learnt counts: show them where they are not the recorded ones.
            captions = [f"real {rc[j]:.0f} / pred {pred[j]:.0f}" + (f" ({label} {learnt[j]:.1f})" if label != "rc" else "")
                        for j in sel]
            figures[name] = _gallery(os.path.join(out_dir, f"gallery_{name}.png"), table, rows[sel], spec, captions,
                                     f"{title} (real / predicted; beam: red cross)")
        figures["heatmaps"] = _heatmaps(os.path.join(out_dir, "heatmaps.png"), model, spec, table, rows, pred,
                                        transform.inverse)
    else:
        threshold = float(info["threshold"])
        # A crystal/empty classifier against the recorded counts; the ice network against its flag.
        flag = info["label"] not in COUNT_LABELS
        truth = (label_counts(table, info["label"], dataset_path)[rows] if flag else rc) >= threshold
        real = f"{info['label']} >= {threshold:g}" if flag else f"rc >= {threshold:g}"
        positive, negative = ("on ice", "not on ice") if flag else ("crystal", "empty")
        metrics = classifier_metrics(truth, raw)
        if not flag:
            metrics.update(expected_count_metrics(table, rows, raw, threshold))
        metrics.update(subset=subset, threshold=threshold)
        metrics["accuracy_ci95"] = crystal_interval(crystals, lambda r: classifier_metrics(truth[r], raw[r])["accuracy"])
        if "accuracy_expected" in metrics:
            metrics["accuracy_expected_ci95"] = crystal_interval(
                crystals, lambda r: expected_count_metrics(table, rows[r], raw[r], threshold)["accuracy_expected"])
        lines += ["| metric | value |", "|---|---|",
                  f"| accuracy | {value_cell(metrics['accuracy'], metrics['accuracy_ci95'], '{:.3f}')} |",
                  f"| balanced accuracy | {format_cell(metrics['balanced_accuracy'], '{:.3f}')} |",
                  f"| recall of {positive} / of {negative} crops | {format_cell(metrics['recall_crystal'], '{:.3f}')}"
                  f" / {format_cell(metrics['recall_empty'], '{:.3f}')} |",
                  *([f"| accuracy against the expected counts | "
                     f"{value_cell(metrics['accuracy_expected'], metrics['accuracy_expected_ci95'], '{:.3f}')} |"]
                    if "accuracy_expected" in metrics else []),
                  f"| {positive} share ({real}) | {format_cell(metrics['positive_fraction'], '{:.3f}')} |",
                  *interval_note(crystals, metrics["accuracy_ci95"], metrics.get("accuracy_expected_ci95"))]
        (tn, fp), (fn, tp) = metrics["confusion"]
        lines += [f"| real \\ predicted | {negative} | {positive} |", "|---|---|---|",
                  f"| {negative} | {tn} | {fp} |", f"| {positive} | {fn} | {tp} |", ""]
        figures["confusion"] = _confusion(os.path.join(out_dir, "confusion.png"), metrics["confusion"], real,
                                          (negative, positive))
        mistaken = truth != (raw >= 0.5)
        collection_lines, collection_records = _collection_table(table, rows, collection_shares(
            table.scan_id[rows], mistaken), {
            "crystal_share": (lambda m: float(np.mean(truth[m])), 3),
            "accuracy": (lambda m: float(np.mean(~mistaken[m])), 3),
        }, collections)
        wrong = np.flatnonzero(mistaken)
        wrong = wrong[np.argsort(np.abs(raw[wrong] - truth[wrong]))[::-1]][:gallery]
        captions = [f"rc {rc[j]:.0f} / p {raw[j]:.2f}" + (f" ({info['label']} {int(truth[j])})" if flag else "")
                    for j in wrong]
        figures["misclassified"] = _gallery(os.path.join(out_dir, "gallery_misclassified.png"), table, rows[wrong], spec,
                                            captions, f"misclassified (real count / {positive} probability)")
    metrics["rows_of_training_crystals"] = seen
    lines += collection_lines
    metrics["collections"] = collection_records
    for name, fig in figures.items():
        if fig:
            lines += [f"## {name}", "", f"![{name}]({fig})", ""]
    metrics["figures"] = {k: v for k, v in figures.items() if v}
    for name in REPORT_FIGURES:
        # A figure of an earlier report in this directory (another model's, or one this model has no room or
        # rows for) would sit beside this report as if it were its own.
        if name not in metrics["figures"].values() and os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    write_text_whole(os.path.join(out_dir, "report.md"), "\n".join(lines))
    write_json_whole(os.path.join(out_dir, "metrics.json"), metrics)
    return metrics


def sweep(dataset_path, out_dir, archs=tuple(f"a{i}" for i in range(1, 11)), transforms=TRANSFORMS, **train_kwargs) -> dict:
    """Train every architecture with every transform; write the Table 2.3 layout.

    Parameters
    ----------
    dataset_path : str
    out_dir : str
        One sub-directory per combination (``<arch>-<transform>``), plus
        ``sweep.md`` and ``sweep.json``.
    archs, transforms : sequence of str
        Regressor architectures and label transforms, checked before any
        training (a name repeated is trained once).
    **train_kwargs
        Passed to :func:`training.train` (crop_um, input_size, epochs,
        batch_size, patience, seed, ...); the same seed gives every
        combination the same split.

    Returns
    -------
    dict
        ``{arch: {transform: test metrics}}``; a combination whose training
        failed has ``{"error": message}`` instead, and the others are still
        trained and reported (every one failing raises the first error).

    Raises
    ------
    ValueError
        A wrong name; a DatasetError (the dataset cannot be read) at once.
    OSError
        If a file stands where ``out_dir`` or a folder above it should be.
    """
    from tqdm import tqdm

    from mxcube_autocenter.learning.architectures import task_of

    # A wrong name is refused now, not hours later when its turn comes.
    archs, transforms = tuple(dict.fromkeys(archs)), tuple(dict.fromkeys(transforms))
    for arch in archs:
        if task_of(arch) != "regression":
            raise ValueError(f"architecture {arch!r} is a classifier: a sweep trains regressors")
    for name in transforms:
        if name not in TRANSFORMS:
            raise ValueError(f"unknown label transform {name!r}: choose from {TRANSFORMS}")
    if not archs or not transforms:
        raise ValueError("a sweep needs at least one architecture and one transform")
    label = train_kwargs.get("label", DEFAULT_LABEL)
    if label not in COUNT_LABELS:
        raise ValueError(f"label {label!r}: a sweep trains regressors of a count, {' or '.join(COUNT_LABELS)}; "
                         "learn a flag with train --arch classifier")
    check_creatable(out_dir, folder=True)
    table = {}  # out_dir is made by the first training, once it has checked the dataset
    combos = [(a, t) for a in archs for t in transforms]
    split = None
    first_error = None
    for arch, name in tqdm(combos, desc="sweep", unit="model"):
        try:
            result = train(dataset_path, arch, name, os.path.join(out_dir, f"{arch}-{name}"), **train_kwargs)
        except DatasetError:
            # The dataset is every combination's: each would fail on it in turn, each with its traceback.
            raise
        except Exception as err:  # noqa: BLE001 - one combination failing (memory, a diverging fit) spares the others
            inside = raised_inside_tensorflow(err)
            if inside is not None:  # a damaged row, found only when tf.data read it
                raise inside from err
            log.error("sweep: %s-%s failed", arch, name, exc_info=True)
            first_line = (str(err).strip().splitlines() or [""])[0]  # a table cell's note: the traceback is logged
            table.setdefault(arch, {})[name] = {"error": f"{type(err).__name__}: {first_line}"}
            first_error = first_error or err
        else:
            this = {k: sorted(result.info["split"][k]) for k in SUBSETS}
            if split is None:
                split = {**this, "rows": dict(result.info["split"].get("rows", {})),
                         "seed": result.info["split"].get("seed")}
            elif this != {k: split[k] for k in SUBSETS}:
                # The table compares models on one test set: a model on other crystals has no place in it.
                raise ValueError(f"{dataset_path}: {arch}-{name} was trained on another split than the sweep's first "
                                 "model (was the dataset changed during the sweep?): run the sweep again")
            table.setdefault(arch, {})[name] = {**result.metrics["test"], "seconds": result.seconds,
                                                "best_epoch": result.best_epoch, "model": result.model_path}
        if split is not None:  # a report only once a model is trained: the directory exists, the split is known
            _write_sweep(out_dir, table, transforms, dataset_path, train_kwargs, split)
    if split is None:
        raise first_error
    return table


def sweep_failures(table) -> dict:
    """``{"<arch>-<transform>": error message}`` of the combinations of a :func:`sweep` table that failed."""
    return {f"{arch}-{name}": cell["error"] for arch, row in table.items() for name, cell in row.items()
            if "error" in cell}


def _write_sweep(out_dir, table, transforms, dataset_path, train_kwargs, split=None):
    header = "| architecture | " + " | ".join(transforms) + " |"
    rule = "|---|" + "---|" * len(transforms)
    label = train_kwargs.get("label", DEFAULT_LABEL)
    subset = ""
    if split is not None:
        rows = split.get("rows", {})
        subset = (f"test subset: {rows.get('test', '?')} crops of {len(split['test'])} crystals (train "
                  f"{rows.get('train', '?')} crops of {len(split['train'])}, validation {rows.get('validation', '?')} "
                  f"of {len(split['validation'])}; split seed {split.get('seed')}), the same for every model")

    def cell(row, transform, key, fmt):
        return "failed" if "error" in row.get(transform, {}) else format_cell(row.get(transform, {}).get(key), fmt)

    lines = ["# Architecture x transform sweep", "", f"dataset: `{os.path.abspath(dataset_path)}`; "
             f"training options: `{json.dumps(train_kwargs, default=str)}`", "", *([subset, ""] if subset else []),
             f"## Test MSE (transformed targets of the {label} counts; the thesis' Table 2.3 layout)", "", header, rule]
    for arch, row in table.items():
        lines.append(f"| {arch} | " + " | ".join(cell(row, t, "mse", "{:.4f}") for t in transforms) + " |")
    lines += ["", "## Test Spearman correlation of predicted and real counts", "", header, rule]
    for arch, row in table.items():
        lines.append(f"| {arch} | " + " | ".join(cell(row, t, "spearman", "{:.3f}") for t in transforms) + " |")
    lines += ["", "MSEs of different transforms are in different units: compare them within a column, "
              "and compare columns by the Spearman correlation.", ""]
    failures = sweep_failures(table)
    if failures:
        lines += ["## Failed", "", *(f"- {combo}: {message}" for combo, message in failures.items()), ""]
    write_text_whole(os.path.join(out_dir, "sweep.md"), "\n".join(lines))
    write_json_whole(os.path.join(out_dir, "sweep.json"), table)
