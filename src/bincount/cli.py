"""The `bincount` command: one subcommand group per stage, each a thin adapter over a library function.

Every failure the user can act on is a `BincountError`; it is printed as one line on stderr with exit 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from bincount.config import DownloadConfig, EdaConfig, PrepareConfig, SyntheticConfig, load_config
from bincount.errors import BincountError

Handler = Callable[[argparse.Namespace], None]


def _options(args: argparse.Namespace, *names: str) -> dict:
    return {name: getattr(args, name) for name in names}


def cmd_synthetic(args: argparse.Namespace) -> None:
    from bincount.data.synthetic import generate

    cfg = load_config(SyntheticConfig, args.config, _options(args, "dest", "n", "seed", "workers"))
    print(generate(cfg).summary())


def cmd_download(args: argparse.Namespace) -> None:
    from bincount.data.abid import download

    cfg = load_config(DownloadConfig, args.config, _options(
        args, "dest", "file_list", "ids", "quantities", "limit", "per_class", "source_endpoint",
        "source_bucket", "source_prefix", "source_region", "source_secure", "workers"))
    summary = download(cfg)
    print(summary.report())
    if summary.failed:
        raise BincountError(f"{summary.failed} pair(s) could not be copied; rerun to retry them")


def cmd_prepare(args: argparse.Namespace) -> None:
    from bincount.data.prepare import prepare

    cfg = load_config(PrepareConfig, args.config, _options(
        args, "store", "name", "balance", "split", "seed", "classes", "workers"))
    print(prepare(cfg).summary())


def cmd_eda(args: argparse.Namespace) -> None:
    from bincount.data.eda import build_report

    cfg = load_config(EdaConfig, args.config, _options(args, "store", "name", "samples_per_class", "workers"))
    print(build_report(cfg).summary())


def _quantity_range(text: str) -> str:
    lo, sep, hi = text.partition("-")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit() or int(lo) > int(hi):
        raise argparse.ArgumentTypeError(f"expected a range like 1-5, got {text!r}")
    return f"{int(lo)},{int(hi)}"


def _ids(values: list[str]) -> list[str]:
    """Ids from the command line: space- or comma-separated; `@file` reads one id per line."""
    out: list[str] = []
    for value in values:
        if value.startswith("@"):
            try:
                with open(value[1:]) as f:
                    out.extend(line.strip() for line in f if line.strip())
            except OSError as e:
                raise BincountError(f"cannot read id file {value[1:]}: {e.strerror}") from None
        else:
            out.extend(v for v in value.split(",") if v)
    return out


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with the same keys as the flags; flags override it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bincount", description=__doc__.splitlines()[0])
    groups = parser.add_subparsers(dest="group", required=True, metavar="{data}")

    data = groups.add_parser("data", help="get, prepare and explore bin images")
    data_cmds = data.add_subparsers(dest="command", required=True)

    p = data_cmds.add_parser("synthetic", help="generate synthetic bin photos in the ABID layout")
    p.add_argument("--dest", help="store root (local path or s3://bucket[/prefix]); writes under raw/")
    p.add_argument("--n", type=int, help="number of images (default 500)")
    p.add_argument("--seed", type=int, help="random seed; the same seed gives the same images")
    p.add_argument("--workers", type=int, help="processes to generate with (default 1)")
    _add_config(p)
    p.set_defaults(func=cmd_synthetic)

    p = data_cmds.add_parser("download", help="copy ABID image+metadata pairs into the store")
    p.add_argument("--dest", help="store root (local path or s3://bucket[/prefix]); writes under raw/")
    sel = p.add_argument_group("selection (one of)")
    sel.add_argument("--file-list", help="file_list.json (local path or s3:// URI): {class: [metadata paths]}")
    sel.add_argument("--ids", nargs="+", help="bin ids (strings: 221 and 00221 differ); @FILE reads one per line")
    sel.add_argument("--quantities", type=_quantity_range, help="scan metadata for EXPECTED_QUANTITY in LO-HI")
    p.add_argument("--limit", type=int, help="stop after this many pairs")
    p.add_argument("--per-class", type=int, help="with --quantities: at most this many pairs per quantity")
    p.add_argument("--source-endpoint", help="S3 endpoint host:port of the ABID source or a mirror")
    p.add_argument("--source-bucket", help="source bucket (default aft-vbi-pds)")
    p.add_argument("--source-prefix", help="prefix above bin-images/ and metadata/ in the source bucket")
    p.add_argument("--source-region", help="source region (default us-east-1)")
    p.add_argument("--source-secure", choices=["0", "1"], help="1 for https (default: https for AWS only)")
    p.add_argument("--workers", type=int, help="parallel copies (default 16)")
    _add_config(p)
    p.set_defaults(func=cmd_download)

    p = data_cmds.add_parser("prepare", help="label, balance and split raw/ into datasets/NAME/")
    p.add_argument("--store", help="store root holding raw/")
    p.add_argument("--name", help="dataset name")
    p.add_argument("--balance", choices=["undersample", "oversample", "none"])
    p.add_argument("--split", help="train,val,test fractions (default 0.7,0.2,0.1)")
    p.add_argument("--seed", type=int)
    p.add_argument("--classes", help="comma-separated item counts to keep (default 1,2,3,4,5)")
    p.add_argument("--workers", type=int, help="parallel reads (default 16)")
    _add_config(p)
    p.set_defaults(func=cmd_prepare)

    p = data_cmds.add_parser("eda", help="plots and report of a prepared dataset → reports/NAME/eda/")
    p.add_argument("--store", help="store root")
    p.add_argument("--name", help="dataset name")
    p.add_argument("--samples-per-class", type=int, help="sample images per class in the grid (default 6)")
    p.add_argument("--workers", type=int, help="parallel reads (default 16)")
    _add_config(p)
    p.set_defaults(func=cmd_eda)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "ids", None):
        args.ids = _ids(args.ids)
    try:
        args.func(args)
    except BincountError as e:
        print(f"bincount: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bincount: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
