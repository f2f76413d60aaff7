"""`focusing pack INPUT... -o corpus.safetensors`: meshes -> one small packed training corpus
(see focusing.data.corpus)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pack",
        help="pack meshes into one small corpus file for training without a cache",
        description="Loads each mesh, normalises it into [-0.5, 0.5]^3, quantises the vertices to 16 bits "
        "(error <= 7.6e-6) and writes all meshes, losslessly compressed, into one safetensors file that "
        "`focusing train` reads directly. Unreadable meshes, meshes above --max-faces and held-out meshes "
        "(--exclude) are reported and skipped.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="mesh files, or folders searched recursively")
    p.add_argument("-o", "--out", required=True, help="output corpus file (.safetensors)")
    p.add_argument("--max-faces", type=int, default=None, help="skip meshes with more faces (default: no limit)")
    p.add_argument("--exclude", nargs="*", default=[], metavar="PATH",
                   help="held-out meshes never to pack: MANIFEST.tsv files, folders or mesh files (matched by "
                   "name, sha256 and geometry)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from focusing.data.corpus import pack_corpus

    report = pack_corpus(args.inputs, args.out, max_faces=args.max_faces, exclude=args.exclude, progress=True)
    print(
        f"packed {report.packed} meshes ({report.vertices:,} vertices, {report.faces:,} faces) into {report.path} "
        f"({report.bytes / 1e6:.2f} MB) in {report.seconds:.1f} s; skipped {len(report.skipped)}"
    )
    return 0
