"""The ``inc-bridge`` command line: ``demo``, ``doctor``, ``inspect``.

Later issues add ``tune``, ``apply``, ``report`` and ``export-onnx``; they wrap the same library calls.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _doctor(_: argparse.Namespace) -> int:
    import torch

    from . import _inc, kernels

    print(f"torch {torch.__version__}, INC {_inc.inc_version()}")
    print(f"{'op':<8}{'backend':<10}status")
    for op in ("linear", "conv2d"):
        for backend in ("emulated", "cpu", "cuda", "hpu"):
            ok = backend in kernels.registered_backends(op)
            print(f"{op:<8}{backend:<10}{'available' if ok else 'not implemented in this version'}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .errors import IncBridgeError
    from .inc_files import load_inc_measurements
    from .measurements import Measurements
    from .recipe import load_recipe

    path = Path(args.path)
    try:
        if path.suffix in (".yaml", ".yml"):
            print(load_recipe(path).to_yaml(), end="")
            return 0
        if path.is_file() and path.suffix == ".json" and "format_version" in json.loads(path.read_text()):
            meas = Measurements.load(path)
        else:
            meas = load_inc_measurements(path)
    except (IncBridgeError, OSError, ValueError) as exc:
        print(f"inc-bridge inspect: {exc}", file=sys.stderr)
        return 2
    print(f"{len(meas)} layers; INC {meas.inc_version or '?'}; config {meas.inc_config}")
    for name, s in meas.layers.items():
        amax = ", ".join(f"{a:.6g}" for a in s.input_amax) or "-"
        print(f"  {name:<48}{s.kind:<9}{s.source.value:<10}input amax {amax}; weight amax {s.weight_amax}")
    return 0


def _demo(_: argparse.Namespace) -> int:
    from .demo import run

    return run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inc-bridge", description="INC FP8 measurements → torchao FP8 models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="train a digits CNN and quantize it to FP8 in both forms").set_defaults(fn=_demo)
    sub.add_parser("doctor", help="list kernel backends and whether they run here").set_defaults(fn=_doctor)
    p = sub.add_parser("inspect", help="show a recipe, a Measurements JSON or an INC dump")
    p.add_argument("path")
    p.set_defaults(fn=_inspect)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
