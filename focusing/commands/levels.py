"""`focusing levels INPUT...`: detail level L1-L4 and sharp-edge density of each mesh (focusing.eval.levels)."""

from __future__ import annotations

import argparse

from focusing.commands.checks import output_file, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "levels",
        help="detail level L1-L4 of each mesh (sharp-edge density)",
        description="Prints one line per mesh, sorted by name: level, sharp-edge density (length of edges whose "
        "normals turn by more than 15 degrees, per unit area, on the smoothed closed surface one voxel around the "
        "mesh at R=128, in the normalised frame; see focusing.eval.levels) and name. A mesh that fails is reported "
        "on stderr with its reason and the run goes on; the exit code is 1 only if every mesh failed, or with --strict if any did.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="mesh files, or folders searched recursively")
    p.add_argument("--json", metavar="OUT", type=output_file(), help="also write every mesh's result and the summary "
                   "to this JSON file (its folder is checked before any mesh is measured)")
    p.add_argument("--quartiles", action="store_true", help="also print the densities' min, quartiles and max")
    p.add_argument("--workers", type=positive_int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--strict", action="store_true", help="exit with code 1 if any mesh failed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def measure(item) -> dict:
    """Result of one `focusing.data.prepare.Item`: {key, source, status, level, density} or {..., error}."""
    from focusing.errors import failure_message
    from focusing.eval.levels import mesh_level
    from focusing.io import load_mesh

    entry = {"key": item.key, "source": item.path}
    try:
        level, density = mesh_level(load_mesh(item.path))
        return {**entry, "status": "ok", "level": level, "density": density}
    except Exception as exc:  # noqa: BLE001  (a batch goes on: record any failure)
        return {**entry, "status": "failed", "error": failure_message(exc)}


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    import numpy as np
    from tqdm import tqdm

    from focusing.data.prepare import find_items, run_pool
    from focusing.eval.levels import LEVEL_RESOLUTION, LEVEL_THRESHOLDS
    from focusing.io import write_text_atomic

    items = find_items(args.inputs)
    results: dict[str, dict] = {}
    bar = tqdm(total=len(items), desc="levels", unit="mesh", disable=args.quiet)

    def record(entry: dict) -> None:
        results[entry["key"]] = entry
        if entry["status"] != "ok":
            bar.write(f"focusing levels: {entry['source']}: {entry['error']}", file=sys.stderr)
        bar.update(1)

    try:
        if args.workers <= 1:
            for item in items:
                record(measure(item))
        else:
            run_pool(items, measure, args.workers, record)
    finally:
        bar.close()

    ok = [results[k] for k in sorted(results) if results[k]["status"] == "ok"]
    failed = [results[k] for k in sorted(results) if results[k]["status"] != "ok"]
    for entry in ok:
        print(f"L{entry['level']}\t{entry['density']:.4f}\t{entry['key']}")
    densities = np.array([e["density"] for e in ok])
    summary = {"count": len(ok), "failed": len(failed)}
    if len(ok):
        q = np.quantile(densities, [0.0, 0.25, 0.5, 0.75, 1.0])
        summary.update(zip(("min", "q25", "median", "q75", "max"), (float(x) for x in q)))
    if args.quartiles:
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    if args.json:
        body = {"resolution": LEVEL_RESOLUTION, "thresholds": list(LEVEL_THRESHOLDS), "summary": summary,
                "meshes": [results[k] for k in sorted(results)]}
        write_text_atomic(args.json, json.dumps(body, indent=1) + "\n")
    return 1 if not ok or (args.strict and failed) else 0
