"""Side-by-side table of `focusing benchmark` runs: per mesh and as means by category (MANIFEST.tsv) and by level.

    python benchmarks/compare.py vae=val/results.csv sdf-mc=benchmarks/results/baselines_sdf-mc_256.csv \\
        poisson=benchmarks/results/baselines_poisson_256.csv gt=benchmarks/results/baselines_gt-resample_256.csv \\
        --manifest ../shared/data/meshes/MANIFEST.tsv --json compare.json

Meshes are matched by name (the results' `name` column without its settings hash); a mean covers only the meshes
that every run scored, so the columns compare the same meshes. A run made in parts is LABEL=A.csv,B.csv (a mesh in
both: the later file's row). Metrics: F@0.005 (100K samples), F@0.002 (1M),
normal consistency. Prints markdown, writes JSON with --json.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `focusing`

from focusing.io.atomic import write_text_atomic  # noqa: E402

METRICS = (("fscore", "F@0.005"), ("fscore_fine", "F@0.002"), ("normal_consistency", "NC"))


def read_run(path: Path) -> dict[str, dict]:
    """{mesh name: row} of the rows that scored (status ok)."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("status") == "ok"]
    return {r["name"].rsplit("-", 1)[0]: r for r in rows}


def read_categories(manifest: Path | None) -> dict[str, str]:
    if manifest is None:
        return {}
    with open(manifest, newline="") as f:
        return {Path(r["file"]).stem: r["category"] for r in csv.DictReader(f, delimiter="\t")}


def means(runs: dict[str, dict], names: list[str]) -> dict[str, dict[str, float]]:
    return {label: {key: statistics.fmean(float(rows[n][key]) for n in names) for key, _ in METRICS}
            for label, rows in runs.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=RESULTS.csv[,MORE.csv]")
    p.add_argument("--manifest", type=Path, default=None, help="MANIFEST.tsv with a category column")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    runs, paths = {}, {}
    for spec in args.runs:
        label, _, path = spec.partition("=")
        if not path:
            p.error(f"{spec}: give LABEL=RESULTS.csv")
        runs[label], paths[label] = {}, path
        for part in path.split(","):
            runs[label].update(read_run(Path(part)))
    categories = read_categories(args.manifest)
    common = sorted(set.intersection(*(set(r) for r in runs.values())))
    if not common:
        p.error("no mesh was scored by every run")
    first = next(iter(runs.values()))
    groups: dict[str, list[str]] = {}
    for n in common:
        groups.setdefault(f"category {categories.get(n, '?')}", []).append(n)
        groups.setdefault(f"level L{first[n]['level']}", []).append(n)
    groups = dict(sorted(groups.items())) | {"all": common}

    labels = list(runs)
    head = " | ".join(f"{label} {short}" for _, short in METRICS for label in labels)
    print(f"| mesh | category | level | {head} |\n|---|---|---:|" + "---:|" * (len(METRICS) * len(labels)))
    for n in common:
        cells = " | ".join(f"{float(runs[label][n][key]):.4f}" for key, _ in METRICS for label in labels)
        print(f"| {n} | {categories.get(n, '?')} | L{first[n]['level']} | {cells} |")
    print(f"\n| group | n | {head} |\n|---|---:|" + "---:|" * (len(METRICS) * len(labels)))
    table = {}
    for group, names in groups.items():
        table[group] = {"n": len(names), **means(runs, names)}
        cells = " | ".join(f"{table[group][label][key]:.4f}" for key, _ in METRICS for label in labels)
        print(f"| {group} | {len(names)} | {cells} |")
    if args.json:
        write_text_atomic(args.json, json.dumps({"runs": paths, "meshes": common, "groups": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
