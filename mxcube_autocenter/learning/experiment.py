"""The reference measurement: a synthetic dataset, the default regressor and the classifier.

``python -m mxcube_autocenter.learning.experiment --out out/learning`` writes
``dataset.h5`` (virtual samples with random looks), trains the default
regressor and the crystal/empty classifier on the same split by crystal,
evaluates both on the held-out test crystals, and writes ``summary.json``
and ``summary.md``. The figures quoted in ``docs/learning.md`` come from it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run(out, *, n_samples=200, crops_per_sample=48, dataset_seed=1, seed=0, arch="fcn", transform="log",
        input_size=128, classifier_input_size=None, crop_um=240.0, epochs=30, classifier_epochs=15, batch_size=32,
        patience=5, threshold=5.0, workers=2, skip_classifier=False, dataset=None) -> dict:
    """Run the measurement into directory ``out``; returns the summary.

    ``dataset``: an existing dataset file to use instead of generating
    ``out/dataset.h5`` from ``n_samples`` virtual samples (seed ``dataset_seed``);
    a path that does not exist is refused.
    """
    import numpy as np

    from mxcube_autocenter.labelling.dataset import read_table
    from mxcube_autocenter.learning.evaluate import evaluate
    from mxcube_autocenter.learning.split import Split
    from mxcube_autocenter.learning.synthetic import synthetic_dataset
    from mxcube_autocenter.learning.training import train, train_classifier
    from mxcube_autocenter.outputs import write_text_whole

    if dataset is not None and not os.path.isfile(dataset):
        # A mistyped path would otherwise be filled with a new synthetic set (minutes) and measured as if given.
        raise FileNotFoundError(f"{dataset}: no such dataset file: check the path, or leave dataset out to generate "
                                f"one in {out}")
    os.makedirs(out, exist_ok=True)
    given = dataset
    dataset = dataset or os.path.join(out, "dataset.h5")
    summary = {"seed": seed}
    if not os.path.exists(dataset):
        start = time.perf_counter()
        summary["dataset"] = synthetic_dataset(dataset, n_samples, dataset_seed, crops_per_sample=crops_per_sample,
                                               workers=workers, progress=False)
        summary["dataset"]["seconds"] = round(time.perf_counter() - start, 1)
    table = read_table(dataset)
    if "dataset" not in summary and given is None:
        # A file left in `out` by an earlier run must be the one asked for.
        prov = table.provenance if isinstance(table.provenance, dict) else {}
        wanted = {"n_samples": n_samples, "seed": dataset_seed, "crops_per_sample": crops_per_sample}
        found = {k: prov.get(k) for k in wanted}
        if found != wanted:
            raise ValueError(f"{dataset} was made with {found}, not {wanted}: delete it, or pass it as dataset=")
    summary.setdefault("dataset", {}).update(rows=len(table), crystals=len(set(table.crystal_id)))
    print(json.dumps(summary["dataset"]), flush=True)

    common = dict(crop_um=crop_um, batch_size=batch_size, patience=patience, seed=seed)
    result = train(dataset, arch, transform, os.path.join(out, "regressor"), input_size=input_size, epochs=epochs,
                   **common)
    summary["regressor"] = {
        "arch": arch, "transform": transform, "input_size": input_size, "params": result.info["architecture"]["params"],
        "train_seconds": round(result.seconds, 1), "train_cpu_seconds": result.info["training"]["cpu_seconds"],
        "epochs_run": result.info["training"]["epochs_run"],
        "best_epoch": result.best_epoch, "split_rows": result.info["split"]["rows"],
        "test": evaluate(result.model_path, dataset, os.path.join(out, "regressor_report")),
        "model": result.model_path,
    }
    print(json.dumps(summary["regressor"], default=str), flush=True)

    if not skip_classifier:
        clf = train_classifier(dataset, os.path.join(out, "classifier"), threshold=threshold,
                               input_size=classifier_input_size or input_size, epochs=classifier_epochs,
                               split=result.info["split"], **common)
        test = evaluate(clf.model_path, dataset, os.path.join(out, "classifier_report"))
        # The ceiling set by label noise: how often the ground-truth expected count is on the same side of the
        # threshold as the Poisson-drawn label.
        rows = Split.from_config(clf.info["split"]).indices(table.crystal_id)["test"]
        ceiling = None
        if "rc_expected" in table.extra:
            ceiling = float(np.mean((table.extra["rc_expected"][rows] >= threshold) == (table.rc[rows] >= threshold)))
        summary["classifier"] = {
            "input_size": classifier_input_size or input_size, "params": clf.info["architecture"]["params"],
            "train_seconds": round(clf.seconds, 1), "train_cpu_seconds": clf.info["training"]["cpu_seconds"],
            "epochs_run": clf.info["training"]["epochs_run"],
            "best_epoch": clf.best_epoch, "test": test, "label_noise_ceiling": ceiling, "model": clf.model_path,
        }
        print(json.dumps(summary["classifier"], default=str), flush=True)

    text = json.dumps(summary, indent=2, default=str)
    write_text_whole(os.path.join(out, "summary.json"), text)
    write_text_whole(os.path.join(out, "summary.md"), "\n".join(["# Learning measurement", "", "```json", text, "```", ""]))
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/learning")
    parser.add_argument("--dataset", default=None, help="use this dataset file instead of generating one")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--crops-per-sample", type=int, default=48)
    parser.add_argument("--dataset-seed", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crop-um", type=float, default=240.0)
    parser.add_argument("--arch", default="fcn")
    parser.add_argument("--transform", default="log")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--classifier-input-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--classifier-epochs", type=int, default=15)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-classifier", action="store_true")
    args = parser.parse_args(argv)
    run(args.out, n_samples=args.samples, crops_per_sample=args.crops_per_sample, dataset_seed=args.dataset_seed,
        seed=args.seed, arch=args.arch, crop_um=args.crop_um, dataset=args.dataset,
        transform=args.transform, input_size=args.input_size, classifier_input_size=args.classifier_input_size,
        epochs=args.epochs, classifier_epochs=args.classifier_epochs, patience=args.patience, workers=args.workers,
        skip_classifier=args.skip_classifier)


if __name__ == "__main__":
    main()
