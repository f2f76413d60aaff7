"""`focusing eval PRED GT`: Chamfer distance and F-score of a predicted mesh against its ground truth."""

from __future__ import annotations

import argparse
import json

from focusing.commands.checks import positive_float, positive_int
from focusing.eval.metrics import PAPER_SAMPLES, PAPER_THRESHOLD


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="Chamfer distance and F-score between a predicted and a ground-truth mesh",
        description="Both meshes are mapped with the GT's normalisation into [-0.5, 0.5]^3, sampled "
        "(area-weighted) and compared by nearest neighbours. CD = mean d(P,G)^2 + mean d(G,P)^2.",
    )
    p.add_argument("pred", help="predicted mesh file")
    p.add_argument("gt", help="ground-truth mesh file")
    p.add_argument("--samples", type=positive_int, default=PAPER_SAMPLES,
                   help="surface samples per mesh (default 100000)")
    p.add_argument("--threshold", type=positive_float, default=PAPER_THRESHOLD,
                   help="F-score distance threshold, positive (default 0.005)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from focusing.commands.format import number
    from focusing.eval.metrics import surface_metrics
    from focusing.io import load_mesh

    m = surface_metrics(load_mesh(args.pred), load_mesh(args.gt), args.samples, args.threshold, args.seed)
    if args.json:
        print(json.dumps(m.as_dict()))
    else:
        print(f"chamfer   {number(m.chamfer / 1e-5)} x 1e-5  (mean squared NN distance, both directions)")
        print(f"f-score   {m.fscore:.4f}  @ {m.threshold:g}  (precision {m.precision:.4f}, recall {m.recall:.4f})")
        print(f"normals   {m.normal_consistency:.4f}  (mean |cos|, both directions)")
    return 0
