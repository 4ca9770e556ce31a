"""The ``embconstraint`` command: ``demo``, ``export``, ``verify`` and ``rows``.

Exit codes: 0 success (``verify``: every pinned row bitwise equal), 1 (``verify`` only) some
pinned row deviates, 2 bad usage, unreadable input or any other error (one line on stderr, no
traceback; never 1).

>>> main(["verify", "no-such-file.pt", "--reference", "ref.pt"])
2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__

__all__ = ["main"]

_PROG = "embconstraint"

_DESCRIPTION = """\
Pin rows of a PyTorch embedding to a reference (vocabulary growth: keep the old rows
exactly, train only the new ones). Commands:

  demo     train a tiny model, grow its vocabulary, retrain with and without the constraint
  export   write the merged weights of a Lightning checkpoint as .safetensors or .pt
  verify   check that the pinned rows of a weight file are bitwise equal to a reference
  rows     write the new rows of a weights file as a rows-only file (for load_rows)

Run 'embconstraint COMMAND --help' for a command's options."""


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(epochs=args.epochs, seed=args.seed, out=args.out, accelerator=args.accelerator)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .files import export_checkpoint

    written = export_checkpoint(
        args.checkpoint, args.out, reference=args.reference, indices=args.indices, reference_key=args.key
    )
    size = sum(v.numel() * v.element_size() for v in written.values() if hasattr(v, "element_size"))
    print(f"wrote {len(written)} tensors ({size / 2**20:.2f} MiB) to {args.out}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .files import verify

    result = verify(
        args.weights, args.reference, key=args.key, indices=args.indices, reference_key=args.reference_key
    )
    print(result.summary())
    return 0 if result.ok else 1


def _rows(args: argparse.Namespace) -> int:
    from .files import extract_rows

    names = extract_rows(args.weights, args.out, num_pinned=args.pinned, keys=args.key)
    print(f"wrote the rows {args.pinned}.. of {', '.join(names)} to {args.out}")
    return 0


_COMMANDS = {  # name: (one-line help, description)
    "demo": (
        "run the vocabulary-growth demo (about 20 s on 2 CPU cores)",
        "Vocabulary growth, end to end, on a dataset generated on the fly (no download): "
        "model 1 learns to predict 12 produce items (6 fruits, 6 vegetables) from a context "
        "sentence; 4 new items join; model 2 is trained on the 16 items twice, without and with "
        "the EmbeddingConstraint callback that pins the 12 old rows to model 1's. Prints how far "
        "the old rows moved, the accuracy on old and new items and the training times, and writes "
        "a PNG of the item embeddings (needs matplotlib: pip install 'embconstraint[demo]') and "
        "the three models' checkpoints into --out.",
    ),
    "export": (
        "write a checkpoint's merged weights as .safetensors or .pt",
        "Write the weights (the 'state_dict' entry, plain keys, constrained embeddings merged) of a "
        "Lightning checkpoint, or of a plain state-dict file, to OUT. The format follows OUT's "
        "extension: .safetensors (needs the safetensors package) or .pt/.pth (torch.save). Raw "
        "'*.parametrizations.weight.original' entries (free rows only) are refused unless --reference "
        "supplies the pinned rows to merge them with.",
    ),
    "verify": (
        "check that pinned rows are bitwise equal to a reference",
        "Compare rows of a weight in WEIGHTS with a reference (n, D) tensor in REF: reference row i "
        "against row indices[i] (default: the first n rows). Prints the max |Δ| over the pinned rows "
        "and the number of rows checked. Exit status: 0 if every pinned row is bitwise equal, "
        "1 if any differs, 2 on an error.",
    ),
    "rows": (
        "write the new rows of a weights file as a rows-only file",
        "Write rows PINNED.. (the new tokens) of each --key weight of WEIGHTS (a .safetensors or .pt "
        "state dict, e.g. a Trainer checkpoint's model.safetensors) to OUT (.safetensors), with their "
        "row indices and a SHA-256 fingerprint of rows 0..PINNED-1; embconstraint.load_rows(model, OUT) "
        "writes them into a model whose first PINNED rows match.",
    ),
}


def _command(sub, name: str) -> argparse.ArgumentParser:
    help_, description = _COMMANDS[name]
    return sub.add_parser(name, help=help_, description=description)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG, description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = _command(sub, "demo")
    demo.add_argument(
        "--epochs", type=_positive_int, default=None, help="training epochs for each model (default: 12)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed for data and models (default: 0)")
    demo.add_argument(
        "--out",
        default=None,
        help="output folder, created if needed (default: ./embconstraint-demo-YYYYmmdd-HHMMSS)",
    )
    demo.add_argument(
        "--accelerator",
        choices=("cpu", "gpu", "auto"),
        default="cpu",
        help="Lightning accelerator (default: cpu; the demo is tiny)",
    )
    demo.set_defaults(func=_demo)

    export = _command(sub, "export")
    _arguments(
        export,
        [
            ("checkpoint", dict(metavar="CHECKPOINT", help="Lightning checkpoint (.ckpt, .pt, ...)")),
            ("out", dict(metavar="OUT", help="output file: .safetensors, .pt or .pth")),
            (
                "--reference",
                dict(
                    metavar="REF",
                    default=None,
                    help="pinned rows (file, .safetensors or .pt) to merge raw parametrization entries",
                ),
            ),
            ("--key", dict(default=None, help="tensor to use in REF when it holds several")),
            (
                "--indices",
                dict(
                    metavar="FILE",
                    default=None,
                    help="rows where REF's rows are pinned (default: the first rows)",
                ),
            ),
        ],
    )
    export.set_defaults(func=_export)

    verify = _command(sub, "verify")
    _arguments(
        verify,
        [
            (
                "weights",
                dict(
                    metavar="WEIGHTS",
                    help=".safetensors or .pt file: a state dict, a Lightning checkpoint or a bare tensor",
                ),
            ),
            (
                "--reference",
                dict(
                    metavar="REF", required=True, help=".safetensors or .pt file holding the reference rows"
                ),
            ),
            (
                "--key",
                dict(
                    metavar="NAME",
                    default=None,
                    help="tensor to check in WEIGHTS (and to use in REF, unless --reference-key); "
                    "default: the only 2-D tensor",
                ),
            ),
            (
                "--reference-key",
                dict(
                    metavar="NAME",
                    default=None,
                    help="tensor to use in REF when it holds a dict (default: --key, or REF's only tensor)",
                ),
            ),
            (
                "--indices",
                dict(
                    metavar="FILE",
                    default=None,
                    help="pinned rows: a text file of integers (whitespace/comma separated) or a .pt tensor",
                ),
            ),
        ],
    )
    verify.set_defaults(func=_verify)

    rows = _command(sub, "rows")
    _arguments(
        rows,
        [
            ("weights", dict(metavar="WEIGHTS", help=".safetensors or .pt file holding a state dict")),
            ("out", dict(metavar="OUT", help="the rows file to write (.safetensors)")),
            (
                "--pinned",
                dict(
                    metavar="N",
                    type=int,
                    required=True,
                    help="number of leading rows that are pinned (the old vocabulary size)",
                ),
            ),
            (
                "--key",
                dict(
                    metavar="NAME",
                    action="append",
                    default=None,
                    help="a weight to take the rows of (repeat for several); default: the only 2-D tensor",
                ),
            ),
        ],
    )
    rows.set_defaults(func=_rows)
    return parser


def _arguments(parser: argparse.ArgumentParser, specs: list[tuple[str, dict]]) -> None:
    for name, kwargs in specs:
        parser.add_argument(name, **kwargs)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``embconstraint`` command line with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit status instead of exiting, so it can be called from Python.

    >>> main(["--version"])
    embconstraint 0.1.0
    0
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(f"{_PROG}: error: a command is required (demo, export, verify or rows)", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as err:
        print(f"{_PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - never Python's exit status 1, which is verify's "rows differ"
        print(
            f"{_PROG}: error: unexpected {type(err).__name__}: {_one_line(err)} (please report it)",
            file=sys.stderr,
        )
        return 2


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
