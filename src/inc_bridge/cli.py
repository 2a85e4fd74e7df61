"""The ``inc-bridge`` command line: ``demo``, ``quantize``, ``tune``, ``apply``, ``report``, ``doctor``, ``inspect``,
``export-onnx``.

Each wraps the library calls of the same name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _doctor(_: argparse.Namespace) -> int:
    """Print the kernel backends, whether each runs here and why, and what each op runs on each."""
    import torch
    import torchao

    from . import _inc, kernels
    from .kernels.cpu import torchao_float8_linear_cpu

    print(f"torch {torch.__version__}, torchao {torchao.__version__}, INC {_inc.inc_version()}")
    backends = sorted(kernels.registered_backends(), key=lambda b: (b != kernels.EMULATED, b))
    status = {b: kernels.backend_availability(b) for b in backends}
    print(f"\n{'backend':<10}{'status':<13}reason")
    for b in backends:
        print(f"{b:<10}{'available' if status[b].available else 'unavailable':<13}{status[b].reason}")
    ao = torchao_float8_linear_cpu()
    print(f"torchao's float8_linear_cpu op: {'runs' if ao.available else 'does not run here'} ({ao.reason})")
    print(f"backend='auto' picks: {kernels.resolve_backend('auto', 'cpu')} for cpu tensors"
          + "".join(f", {kernels.resolve_backend('auto', d)} for {d} tensors" for d in ("cuda", "hpu")))
    print(f"\n{'op':<11}{'backend':<10}{'status':<13}kernel")
    for op in kernels.OPS:
        for b in backends:
            state = "available" if status[b].available else "unavailable"
            print(f"{op:<11}{b:<10}{state:<13}{kernels.kernel_note(op, b)}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .inc_files import load_inc_measurements
    from .measurements import Measurements
    from .recipe import load_recipe

    path = Path(args.path)
    if path.suffix in (".yaml", ".yml"):
        print(load_recipe(path).to_yaml(), end="")
        return 0
    if path.is_dir() and (path / "inc_bridge.json").exists():
        return _inspect_saved(path)
    if path.suffix == ".json" and _is_measurements_file(path):
        meas = Measurements.load(path)
    else:
        meas = load_inc_measurements(path)
    print(f"{len(meas)} layer{'' if len(meas) == 1 else 's'}; INC {meas.inc_version or '?'}; config {meas.inc_config}")
    rows = [("layer", "kind", "source", "input amax", "weight amax")]
    for name, st in meas.layers.items():
        weight_text = "-" if st.weight_amax is None else f"{st.weight_amax:.6g}"
        if st.weight_amax_per_channel:
            weight_text += f" ({len(st.weight_amax_per_channel)} channels)"
        rows.append((name, st.kind or "?", st.source.value, ", ".join(f"{a:.6g}" for a in st.input_amax) or "-",
                     weight_text))
    print(_table(rows))
    return 0


def _table(rows: list[tuple[str, ...]]) -> str:
    """Rows as left-aligned columns two spaces apart, each as wide as its widest cell."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _is_measurements_file(path: Path) -> bool:
    """Whether a JSON file is inc_bridge's Measurements (a JSON object with ``format_version``), read
    as untrusted data: regular files only (a FIFO would hang ``read_text``), bounded size and depth."""
    from .errors import SerializationError
    from .safe_io import MiB, loads_json, read_text

    if not path.exists() or path.is_dir():
        return False  # load_inc_measurements says what it expected
    text = read_text(path, max_bytes=1024 * MiB, error=SerializationError, what="JSON file")
    value = loads_json(text, origin=str(path), error=SerializationError)
    return isinstance(value, dict) and "format_version" in value


def _inspect_saved(path: Path) -> int:
    """Summarise a directory written by ``ib.save``."""
    from .serialization.files import read_manifest

    manifest = read_manifest(path)

    def section(key: str) -> dict:
        value = manifest.get(key)
        return value if isinstance(value, dict) else {}

    layers = section("layers")
    versions = ", ".join(f"{k} {v}" for k, v in section("versions").items())
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file() and not f.is_symlink())
    print(f"saved FP8 model: format version {manifest.get('format_version')}, form {manifest.get('form')}, "
          f"backend {manifest.get('backend')}, {len(layers)} quantized layers, {size} bytes on disk")
    print(f"written by: {versions}")
    kinds: dict[str, int] = {}
    for layer in layers.values():
        kind = str(layer.get("kind", "?")) if isinstance(layer, dict) else "?"
        kinds[kind] = kinds.get(kind, 0) + 1
    print("layers by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    for name, why in section("skipped").items():
        print(f"  kept in high precision: {name}: {why}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(Path(args.out) if args.out else None, quiet=args.quiet)


def _model_from(recipe) -> object:
    from .errors import RecipeError
    from .recipe import resolve_callable

    if recipe.model is None:
        raise RecipeError("model: missing; the CLI needs model.factory: 'package.module:function' returning the float model")
    return resolve_callable(recipe.model.factory, "model.factory")()


def _folder_inputs(args: argparse.Namespace) -> tuple[object, object, list]:
    """``--model DIR`` and ``--calib FILE``: the float model, its tokenizer and calibration batches."""
    from .hf_folder import load_model_folder, read_calibration_texts, token_batches

    texts = read_calibration_texts(Path(args.calib), args.max_samples)  # a bad file fails before the model loads
    model, tokenizer = load_model_folder(Path(args.model))
    return model, tokenizer, token_batches(tokenizer, texts, args.seq_len)


def _quantize(args: argparse.Namespace) -> int:
    from .hf_folder import Progress
    from .pipeline import quantize
    from .recipe import load_recipe

    recipe = load_recipe(Path(args.recipe)) if args.recipe else None
    model, tokenizer, batches = _folder_inputs(args)
    qmodel = quantize(model, Progress(batches, "calibrating", not args.quiet), recipe)
    out = _write_quantized(qmodel, tokenizer, batches[0], Path(args.out), args.format)
    print(f"quantized {len(_converted(qmodel))} layers with {len(batches)} calibration samples; wrote {out} "
          f"({args.format})")
    return 0


def _converted(qmodel: object) -> dict:
    from .convert import conversion_result

    return conversion_result(qmodel).converted


def _write_quantized(qmodel, tokenizer, example: dict, out: Path, fmt: str) -> Path:
    from .onnx_export import export_onnx
    from .serialization.pretrained import save_pretrained

    if fmt != "onnx":
        return save_pretrained(qmodel, out, format=fmt, tokenizer=tokenizer)
    from .errors import SerializationError

    if out.suffix != ".onnx":
        raise SerializationError(f"{out}: --format onnx writes one .onnx file; give --out a name ending in .onnx")
    if example["input_ids"].shape[1] < 2:
        raise SerializationError("--format onnx needs a calibration sample of two tokens or more as the example input")
    # torch.export fixes dimensions of size 1: the example is two copies of the first sample
    return export_onnx(qmodel, {k: v.repeat(2, 1) for k, v in example.items()}, out)


def _tune(args: argparse.Namespace) -> int:
    import tempfile

    from .errors import RecipeError
    from .recipe import default_recipe, load_recipe
    from .report import ReportFormat
    from .tune import autotune

    if (args.model is None) != (args.calib is None):
        raise RecipeError("--model and --calib go together (a model folder and its calibration text)")
    if args.recipe is None and args.model is None:
        raise RecipeError("give a recipe that names model.factory, or --model DIR --calib FILE")
    recipe = load_recipe(Path(args.recipe)) if args.recipe else default_recipe()
    eval_fn, calib_data = None, None
    if args.model is not None:
        from .hf_folder import Progress, mean_log_likelihood, read_calibration_texts, token_batches

        model, tokenizer, batches = _folder_inputs(args)
        calib_data = Progress(batches, "calibrating", not args.quiet)
        if recipe.evaluation.fn is None:  # the default metric: log-likelihood of the eval (or calibration) text
            eval_texts = read_calibration_texts(Path(args.eval), args.max_samples) if args.eval else None
            eval_batches = token_batches(tokenizer, eval_texts, args.seq_len) if eval_texts else batches
            eval_fn = mean_log_likelihood(eval_batches)
            recipe = recipe.model_copy(update={"evaluation": recipe.evaluation.model_copy(update={"higher_is_better": True})})
    else:
        model = _model_from(recipe)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="inc_bridge_tune_"))
    try:
        result = autotune(model, eval_fn, calib_data=calib_data, recipe=recipe, output_dir=out, resume=args.resume,
                          progress=not args.quiet)
    except BaseException:
        if not args.out and not any(out.iterdir()):
            out.rmdir()  # a directory we made for a run that wrote nothing: leave no trace
        raise
    r = result.report
    kept = [row.name for row in r.layers if not row.quantized]
    print(f"baseline {r.baseline_metric:.6g}, FP8 {r.final_metric if r.final_metric is not None else float('nan'):.6g}, "
          f"threshold {r.tolerance['threshold']:.6g}: goal {'met' if r.goal_met else 'NOT met'} after {len(r.trials)} trials")
    print(f"kept in high precision: {', '.join(kept) if kept else 'none'}")
    print("time: " + ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in r.timings.items() if seconds > 0))
    page = "report.html" if ReportFormat.HTML in recipe.report.formats else ""  # else the report directory
    print(f"report: {out / 'report' / page}\nlocked recipe: {out / 'locked_recipe.yaml'}")
    return 0 if r.goal_met else 1


def _apply(args: argparse.Namespace) -> int:
    from . import save
    from .recipe import load_recipe
    from .tune import apply_recipe

    recipe = load_recipe(Path(args.recipe))
    qmodel = apply_recipe(_model_from(recipe), recipe)
    path = save(qmodel, Path(args.out))
    print(f"saved the FP8 model to {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import Report

    directory = Path(args.dir)
    if (directory / "report" / "report.json").exists() and not (directory / "report.json").exists():
        directory = directory / "report"  # an autotune output_dir
    Report.load(directory).save(directory)
    print(f"rendered {directory / 'report.md'} and {directory / 'report.html'}")
    return 0


def _saved_with_attention(directory: Path) -> bool:
    """Whether a saved model quantized captured attention (its manifest lists sdpa / bmm layers)."""
    from .serialization.files import read_manifest

    layers = read_manifest(directory)["layers"]
    return any(isinstance(rec, dict) and rec.get("kind") in ("sdpa", "bmm") for rec in layers.values())


def _export_onnx(args: argparse.Namespace) -> int:
    from .capture import capture_attention
    from .onnx_export import export_onnx
    from .recipe import resolve_callable
    from .serialization import load

    build_model = resolve_callable(args.model, "--model")
    build_inputs = resolve_callable(args.inputs, "--inputs")
    skeleton, example = build_model(), build_inputs()
    if args.capture_attention or _saved_with_attention(Path(args.saved_dir)):
        skeleton = capture_attention(skeleton, example)  # the skeleton needs the SDPA / Matmul modules the save has
    qmodel = load(skeleton, Path(args.saved_dir), backend=args.backend)
    out = export_onnx(qmodel, example, Path(args.out), opset=args.opset)
    print(f"wrote {out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    """Run a subcommand: an error becomes one line ``inc-bridge <cmd>: <message>`` on stderr and exit
    status 2 (130 for Ctrl-C); ``--traceback`` shows where instead.

    Besides IncBridgeError, any other exception is reported the same way (with its type): bad input
    that a reader has not yet turned into an IncBridgeError, or an error in the user's code that a
    recipe names (model factory, evaluation), is not a crash of the command.
    """
    from .errors import IncBridgeError
    from .safe_io import shorten

    if args.traceback:
        return args.fn(args)
    try:
        return args.fn(args)
    except IncBridgeError as exc:
        message = shorten(str(exc), 2000)
    except Exception as exc:  # noqa: BLE001 - the command line prints one line, never a traceback
        message = f"{type(exc).__name__}: {shorten(str(exc), 500)} (run with --traceback for details)"
    except KeyboardInterrupt:
        print(f"inc-bridge {args.command}: interrupted", file=sys.stderr)
        return 130
    print(f"inc-bridge {args.command}: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _add_calib_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--calib", required=required, metavar="FILE",
                   help="calibration text: .txt (one sample per line) or .jsonl (a \"text\" field per line)")
    p.add_argument("--max-samples", type=_positive, default=128, metavar="N", help="use the first N samples (default 128)")
    p.add_argument("--seq-len", type=_positive, default=512, metavar="L", help="truncate samples to L tokens (default 512)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inc-bridge", description="INC FP8 measurements → torchao FP8 models.")
    parser.add_argument("--traceback", action="store_true", help="show the Python traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="autotune a digits CNN to FP8 (demo_digits.yaml) and print a summary")
    p.add_argument("--out", help="directory for the report and locked recipe (default: a new temporary one)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_demo)
    p = sub.add_parser(
        "quantize",
        help="quantize a Hugging Face causal LM folder with calibration text and write it out",
        description="Load the model and tokenizer from DIR (local files only), calibrate on the samples of FILE "
        "(.txt: one per line; .jsonl: the \"text\" of each object), quantize with the recipe (default: FP8 e4m3, "
        "static per-tensor scales on every Linear) and write OUT.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="a Hugging Face model folder (config.json, weights, tokenizer)")
    _add_calib_args(p, required=True)
    p.add_argument("--recipe", help="recipe YAML (default: the default recipe)")
    p.add_argument("--out", required=True, help="the folder to write (a .onnx file with --format onnx)")
    p.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors", "inc_bridge", "onnx"],
                   help="compressed-tensors (transformers, vLLM), inc_bridge (ib.load), onnx (FP8 QDQ graph)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_quantize)
    p = sub.add_parser("tune", help="autotune the model a recipe names (model, calibration, evaluation sections), "
                                    "or a Hugging Face model folder (--model, --calib)")
    p.add_argument("recipe", nargs="?", help="recipe YAML (optional with --model: the default recipe)")
    p.add_argument("--model", metavar="DIR", help="a Hugging Face model folder, in place of the recipe's model.factory")
    _add_calib_args(p, required=False)
    p.add_argument("--eval", metavar="FILE", help="with --model: text to judge by (mean token log-likelihood) when the "
                                                  "recipe names no evaluation.fn (default: the calibration text)")
    p.add_argument("--out", help="output directory (default: a new temporary one)")
    p.add_argument("--resume", action="store_true", help="continue the run recorded in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_tune)
    p = sub.add_parser("apply", help="rebuild and save the FP8 model a locked recipe describes")
    p.add_argument("recipe")
    p.add_argument("--out", required=True, help="directory to save the model to")
    p.set_defaults(fn=_apply)
    p = sub.add_parser("report", help="re-render report.md and report.html from report.json")
    p.add_argument("dir")
    p.set_defaults(fn=_report)
    sub.add_parser("doctor", help="list kernel backends and whether they run here").set_defaults(fn=_doctor)
    p = sub.add_parser("inspect", help="show a recipe, a Measurements JSON or an INC dump")
    p.add_argument("path")
    p.set_defaults(fn=_inspect)
    p = sub.add_parser(
        "export-onnx",
        help="export a model saved by inc_bridge.save to ONNX with FP8 QDQ",
        description="Load SAVED_DIR into the float model that --model builds, then export it with example inputs "
        "from --inputs. Both name an importable callable as package.module:function.",
    )
    p.add_argument("saved_dir", metavar="SAVED_DIR", help="a directory written by inc_bridge.save")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--model", required=True, metavar="MODULE:FACTORY", help="callable returning the float model (the skeleton)")
    p.add_argument("--inputs", required=True, metavar="MODULE:FACTORY",
                   help="callable returning example inputs: a tensor, a tuple of arguments or a dict of keyword arguments")
    p.add_argument("--opset", type=int, default=21, help="ONNX opset (at least 21; default 21)")
    p.add_argument("--backend", default=None, help="kernel backend to load with (default: the saved one)")
    p.add_argument("--capture-attention", action="store_true",
                   help="capture the model's attention call sites before loading (automatic when the save holds "
                        "quantized attention)")
    p.set_defaults(fn=_export_onnx)
    args = parser.parse_args(argv)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
