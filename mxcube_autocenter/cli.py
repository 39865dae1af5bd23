"""The ``mxcube-autocenter`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _patch_gevent():
    # As MXCuBE does, before mxcubecore is imported; real threads stay real so
    # heavy work can leave the event loop.
    from gevent import monkey

    monkey.patch_all(thread=False)


def cmd_demo(args) -> int:
    """Boot the virtual beamline with the plugin, report what loaded, save a snapshot."""
    _patch_gevent()
    import cv2

    from mxcube_autocenter.beamline import auto_centring, hardware_repository

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with hardware_repository(args.config) as beamline:
        print("Loaded hardware objects:")
        for role in beamline.get_roles():
            obj = beamline.get_object_by_role(role)
            print(f"  {role:<16} {type(obj).__name__ if obj is not None else 'NOT LOADED'}")
        ho = auto_centring(beamline)
        print("AutoCenter settings:")
        settings = ho.settings()
        width = max(map(len, settings))
        for name, value in settings.items():
            print(f"  {name:<{width}} {value!r}")
        beamline.sample_changer.load((1, 1))
        sample = beamline.sample_changer.mounted.sample
        print(f"Mounted virtual sample 1:1 (seed {sample.seed}): {sample.loop_kind} loop, {len(sample.crystals)} crystal(s)")
        motors = beamline.diffractometer.get_value_motors(
            ["omega", "phiy", "phiz", "sampx", "sampy"]
        )
        print("Motors:", ", ".join(f"{k}={v:.3f}" for k, v in motors.items()))
        frame = beamline.sample_view.get_snapshot(return_as_array=True)
        path = out / "snapshot.png"
        cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        print(f"Camera snapshot {frame.shape[1]}x{frame.shape[0]} saved to {path}")
    return 0


def cmd_bench(args) -> int:
    """Run the benchmarks and print their figures."""
    _patch_gevent()
    import json

    from mxcube_autocenter.bench import run_all

    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    figures = run_all(quick=args.quick, only=args.only, progress=log)
    if args.json:
        print(json.dumps(figures, sort_keys=True))
    else:
        width = max(map(len, figures), default=0)
        for name, value in figures.items():
            print(f"{name:<{width}}  {value:.4g}")
    return 0


def cmd_inspect(args) -> int:
    """Summarise a camera recording and write a contact sheet of its frames."""
    from mxcube_autocenter.recording import RecordingError, contact_sheet, summarise

    status = 0
    for path in args.recordings:
        try:
            print(summarise(path))
            png = Path(args.png) if args.png and len(args.recordings) == 1 else Path(path).with_suffix(".png")
            contact_sheet(path, png, n=args.frames)
            print(f"  contact sheet {png}")
        except (OSError, RecordingError) as err:
            print(f"{path}: {err}", file=sys.stderr)
            status = 1
    return status


class _ImageProgress:
    """A tqdm bar advanced by the collect object's ``collectImageTaken`` signal."""

    def __init__(self, collect, total, desc):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="image")
        self._collect = collect
        collect.connect("collectImageTaken", self.image_taken)

    def image_taken(self, *args):
        self.bar.update(1)

    def close(self):
        self._collect.disconnect("collectImageTaken", self.image_taken)
        self.bar.close()


def cmd_simulate(args) -> int:
    """Gallery of one virtual sample and a helical + rotational collection of it."""
    _patch_gevent()
    import cv2
    import numpy as np

    from mxcube_autocenter.beamline import hardware_repository
    from mxcube_autocenter.simulation.experiments import helical_end_points, run_collection
    from mxcube_autocenter.simulation.gallery import sample_gallery
    from mxcube_autocenter.simulation.render import Renderer
    from mxcube_autocenter.simulation.sample import make_sample

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with hardware_repository(args.config) as beamline:
        mounted = beamline.sample_changer.mount(make_sample(args.seed), crystal_id=f"seed{args.seed}")
        sample = mounted.sample
        print(
            f"Sample {args.seed}: {sample.loop_kind} loop of {sample.loop_size_um:.0f} um, "
            f"{len(sample.crystals)} crystal(s): "
            + (", ".join(f"{c.habit} {c.volume_um3 ** (1 / 3):.0f} um" for c in sample.crystals) or "empty")
        )
        gallery = sample_gallery(sample, mounted.diffraction, Renderer())
        cv2.imwrite(str(out / "gallery.png"), cv2.cvtColor(gallery, cv2.COLOR_RGB2BGR))
        print(f"Gallery (crystal outlines yellow, beam red cross, best point red circle): {out / 'gallery.png'}")
        rng = np.random.default_rng(args.seed)
        point, _ = mounted.best_point()
        centre = sample.loop_centre if point is None else point
        scans = [
            ("Helical", {"helical": helical_end_points(mounted, rng), "osc_range": 0.1}),
            ("OSC", {"osc_range": 1.0}),
        ]
        for run, (kind, extra) in enumerate(scans, start=1):
            beamline.diffractometer.set_value_motors(
                {"phiy": float(centre[0]), "phiz": 0.0, "sampx": float(centre[1]), "sampy": float(centre[2])}, timeout=30
            )
            progress = _ImageProgress(beamline.collect, args.images, f"{kind} collection")
            try:
                run_collection(
                    beamline, out / "data", f"sample{args.seed}", experiment_type=kind, run_number=run,
                    n_images=args.images, exposure_time=args.exposure, crystal_id=mounted.crystal_id, **extra,
                )
            finally:
                progress.close()
            counts = beamline.collect.last_collection["reflection_counts"]
            print(
                f"{kind}: {len(counts)} frames, reflection counts {min(counts)}-{max(counts)} "
                f"(mean {np.mean(counts):.1f}), master file {beamline.collect.last_collection['master_file']}"
            )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mxcube-autocenter",
        description=(
            "Optical crystal centring for MXCuBE: record training frames, label them "
            "with reflection counts, train, centre, and score on the virtual beamline."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser("demo", help="run the main job on the virtual beamline")
    demo.add_argument("--config", help="beamline configuration directory (default: virtual beamline)")
    demo.add_argument("--out", default="out/demo", help="output directory (default: %(default)s)")
    demo.set_defaults(func=cmd_demo)

    sim = sub.add_parser("simulate", help="virtual beamline: sample gallery and a helical + rotational collection")
    sim.add_argument("--seed", type=int, default=16, help="virtual sample seed (default: %(default)s)")
    sim.add_argument("--images", type=int, default=80, help="images per collection (default: %(default)s)")
    sim.add_argument("--exposure", type=float, default=0.05, help="exposure per image, s (default: %(default)s)")
    sim.add_argument("--config", help="beamline configuration directory (default: virtual beamline)")
    sim.add_argument("--out", default="out/simulate", help="output directory (default: %(default)s)")
    sim.set_defaults(func=cmd_simulate)
    inspect = sub.add_parser("inspect", help="summarise camera recordings and write contact sheets")
    inspect.add_argument("recordings", nargs="+", metavar="RECORDING.h5")
    inspect.add_argument("--png", help="contact sheet path (one recording; default: next to it)")
    inspect.add_argument("--frames", type=int, default=16, help="frames on the sheet (default: %(default)s)")
    inspect.set_defaults(func=cmd_inspect)

    bench = sub.add_parser("bench", help="speed and memory benchmarks, printed as figures")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--quick", action="store_true", help="fewer repetitions (under 5 minutes)")
    bench.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
