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
        for name, value in ho.settings().items():
            print(f"  {name:<20} {value!r}")
        motors = beamline.diffractometer.get_value_motors(
            ["omega", "phiy", "phiz", "sampx", "sampy"]
        )
        print("Motors:", ", ".join(f"{k}={v:.3f}" for k, v in motors.items()))
        frame = beamline.sample_view.get_snapshot(return_as_array=True)
        path = out / "snapshot.png"
        cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        print(f"Camera snapshot {frame.shape[1]}x{frame.shape[0]} saved to {path}")
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
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
