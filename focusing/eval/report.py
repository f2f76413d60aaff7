"""The visual benchmark report: one HTML page with, per mesh, GT and prediction rendered from the same views, the
prediction coloured by its distance to the GT surface, and the benchmark's numbers.

Input, a benchmark folder BENCH_DIR written by the benchmark runner:
- `results.csv`: one row per mesh with the columns of `COLUMNS` (others are ignored); `gt_path` is absolute or
  relative to BENCH_DIR, `pred_path` relative to BENCH_DIR (empty when the run failed);
- `meshes/<name>.ply`: the prediction, already in the GT's normalised frame (`focusing.io.normalize` of the GT);
- `table.md` (optional): the benchmark's summary by level, shown as the summary; else it is computed here.

Output, written atomically: `BENCH_DIR/report/index.html`, `report/legend.png` and per mesh
`report/<name>/view_<k>_{gt,pred,error}.png` plus `report/<name>/render.json` (the settings, written last). A
mesh is rendered again only when its `render.json` is missing, has other settings, or is older than the pred or
GT file, so calling `write_report` after every benchmark run is cheap. A mesh that cannot be loaded or rendered
is listed as failed; the report still completes.

Error view: every pixel covered by the prediction is coloured by the distance from the surface point it shows
(hit triangle and perspective-correct barycentrics) to the GT surface (`surface_error`), on a fixed ramp from 0
to `ERROR_VMAX` = 2 x the F-score threshold (the threshold is the ramp's yellow middle).
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch

from focusing.device import resolve_device
from focusing.errors import FocusingError, InputError
from focusing.eval.metrics import PAPER_THRESHOLD
from focusing.io import Mesh, load_mesh, normalize, write_text_atomic

COLUMNS = ("name", "gt_path", "pred_path", "method", "resolution", "level", "status", "error", "seconds", "chamfer",
           "fscore", "precision", "recall", "normal_consistency", "fscore_fine", "chamfer_fine")
ERROR_VMAX = 2 * PAPER_THRESHOLD
FOV_DEG = 40.0
ELEVATION_DEG = 20.0
MARGIN = 1.05
"""Camera distance over the distance at which the meshes' bounding sphere just touches the image border."""
KINDS = ("gt", "pred", "error")
ERROR_SAMPLES = 1_000_000
ERROR_NEIGHBOURS = 4


def read_results(bench_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of BENCH_DIR/results.csv (all values as strings, missing optional values as "")."""
    path = Path(bench_dir) / "results.csv"
    if not path.is_file():
        raise InputError(path, "no such file (is this a benchmark output folder?)")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("name", "gt_path", "pred_path", "status") if c not in (reader.fieldnames or ())]
        if missing:
            raise InputError(path, f"missing column(s) {', '.join(missing)}")
        return [{c: (row.get(c) or "").strip() for c in COLUMNS} for row in reader]


def surface_points(vertices: torch.Tensor, faces: torch.Tensor, camera, tri_id: torch.Tensor) -> torch.Tensor:
    """World points [B, H, W, 3] seen at the pixel centres, from the hit triangles `tri_id` [B, H, W] (-1: none)
    of `vertices` [V, 3] / `faces` [F, 3] and their perspective-correct barycentrics (0 on the background)."""
    from focusing.render.interpolate import pixel_barycentrics
    from focusing.render.raster import clip_space

    bary = pixel_barycentrics(clip_space(vertices, camera.mvp()), faces, tri_id)
    corners = vertices[faces[tri_id.clamp_min(0)]]                       # [B, H, W, 3, 3]
    return (bary[..., None] * corners).sum(-2)


def surface_error(points: np.ndarray, mesh: Mesh, n_samples: int = ERROR_SAMPLES, k: int = ERROR_NEIGHBOURS,
                  chunk: int = 65536) -> np.ndarray:
    """Distances [N] from points [N, 3] to the surface of `mesh`: the exact distance to the triangles of the `k`
    nearest of `n_samples` area-weighted surface samples (pykdtree). Never more than the distance to the nearest
    sample; exact unless the nearest triangle holds none of those samples (triangles far below the sample spacing,
    about sqrt(area / n_samples))."""
    from pykdtree.kdtree import KDTree

    from focusing.data.distance import point_triangle_distance
    from focusing.data.sampling import sample_surface

    samples = sample_surface(mesh, n_samples)
    tree = KDTree(samples.points.astype(np.float64))
    points = np.ascontiguousarray(points, dtype=np.float64).reshape(-1, 3)
    out = np.empty(len(points))
    for start in range(0, len(points), chunk):
        p = points[start:start + chunk]
        _, idx = tree.query(p, k=k)
        tri = mesh.vertices[mesh.faces[samples.face_index[idx.reshape(len(p), k)]]]          # [n, k, 3, 3]
        d = point_triangle_distance(torch.from_numpy(p)[:, None], torch.from_numpy(tri))
        out[start:start + chunk] = d.min(1).values.numpy()
    return out


def framing_camera(meshes: list[Mesh], views: int, resolution: int, device=None):
    """`views` orbit cameras (`focusing.render.camera.orbit_cameras`) looking at the origin from just far enough
    that the bounding sphere about the origin of all `meshes` (capped at twice the unit cube's) is in view."""
    from focusing.render.camera import orbit_cameras

    extent = min(max(float(np.linalg.norm(m.vertices, axis=1).max()) for m in meshes), math.sqrt(3))
    return orbit_cameras(views, radius=MARGIN * extent / math.sin(math.radians(FOV_DEG / 2)),
                         elevation_deg=ELEVATION_DEG, fov_deg=FOV_DEG, resolution=resolution, device=device)


def render_comparison(gt: Mesh, pred: Mesh, camera, vmax: float = ERROR_VMAX) -> dict[str, np.ndarray]:
    """GT normals, prediction normals and prediction error pictures, uint8 [B, H, W, 3] each (keys `KINDS`), of two
    meshes in the normalised frame, from the same `camera` (B views; rendered on the camera's device)."""
    from focusing.render import render_mesh
    from focusing.render.images import error_to_rgb, normal_to_rgb

    device = camera.device
    with torch.no_grad():
        tensors = {}
        for kind, mesh in (("gt", gt), ("pred", pred)):
            vertices = torch.as_tensor(mesh.vertices, dtype=torch.float32, device=device)
            faces = torch.as_tensor(mesh.faces, device=device)
            tensors[kind] = (vertices, faces, render_mesh(vertices, faces, camera))
        out = {kind: [normal_to_rgb(r.normal[i], r.mask[i]) for i in range(len(camera))]
               for kind, (_, _, r) in tensors.items()}
        vertices, faces, r = tensors["pred"]
        covered = (r.tri_id >= 0).cpu()
        points = surface_points(vertices, faces, camera, r.tri_id).cpu()[covered]
        error = torch.zeros(covered.shape, dtype=torch.float64)
        error[covered] = torch.from_numpy(surface_error(points.numpy(), gt))
        out["error"] = [error_to_rgb(error[i], covered[i], vmax) for i in range(len(camera))]
    return {kind: np.stack(images) for kind, images in out.items()}


def write_report(bench_dir: str | os.PathLike, *, views: int = 3, resolution: int = 384, device=None,
                 progress: bool = False) -> Path:
    """Render the pictures (or keep the up-to-date ones) and write BENCH_DIR/report/index.html; returns its path.

    device: torch device or "auto"/None (CUDA when available, else CPU).
    """
    from tqdm import tqdm

    from focusing.render.images import error_to_rgb, save_png

    if views < 1 or resolution < 8:
        raise FocusingError(f"need at least 1 view and 8 pixels, got {views} views of {resolution} px")
    bench_dir = Path(bench_dir)
    rows = read_results(bench_dir)
    device = resolve_device(device)
    settings = {"views": views, "resolution": resolution, "margin": MARGIN, "elevation_deg": ELEVATION_DEG,
                "fov_deg": FOV_DEG, "vmax": ERROR_VMAX}
    out = bench_dir / "report"
    problems: dict[int, str] = {}                 # row index -> why it has no pictures
    seen: set[str] = set()
    for i, row in enumerate(tqdm(rows, desc="report", unit="mesh", disable=not progress)):
        try:
            _check_name(row["name"], seen)
            if row["status"] != "ok":
                continue
            gt_path, pred_path = _gt_and_pred(bench_dir, row)
            folder = out / row["name"]
            if not _up_to_date(folder, settings, (gt_path, pred_path)):
                gt, pred = normalize(load_mesh(gt_path), gt_path)[0], load_mesh(pred_path)
                images = render_comparison(gt, pred, framing_camera([gt, pred], views, resolution, device))
                for stale in folder.glob("view_*.png"):  # pictures of an earlier run with more views
                    stale.unlink()
                for kind, stack in images.items():
                    for k, image in enumerate(stack):
                        save_png(image, folder / f"view_{k}_{kind}.png")
                write_text_atomic(folder / "render.json", json.dumps(settings))
        except Exception as exc:  # a batch job reports the item and goes on (out of memory, corrupt files, ...)
            problems[i] = _one_line(exc)
    ramp = np.linspace(0.0, ERROR_VMAX, 256)[None].repeat(12, 0)
    save_png(error_to_rgb(ramp, vmax=ERROR_VMAX), out / "legend.png")
    index = out / "index.html"
    write_text_atomic(index, _page(bench_dir, rows, problems, views))
    return index


def _check_name(name: str, seen: set[str]) -> None:
    """Names become folder names and anchors: one path component, unique."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise FocusingError(f"name {name!r} is not a file name")
    if name in seen:
        raise FocusingError(f"name {name!r} appears twice in results.csv")
    seen.add(name)


def _gt_and_pred(bench_dir: Path, row: dict[str, str]) -> tuple[Path, Path]:
    if not row["pred_path"]:
        raise FocusingError("status is ok but pred_path is empty")
    return bench_dir / row["gt_path"], bench_dir / row["pred_path"]


def _up_to_date(folder: Path, settings: dict, sources: tuple[Path, ...]) -> bool:
    """Whether `folder` holds pictures made with `settings` after the last change of every source file."""
    stamp = folder / "render.json"
    try:
        if json.loads(stamp.read_text()) != settings:
            return False
        newest = max(p.stat().st_mtime for p in sources)
    except (OSError, ValueError):
        return False
    names = [f"view_{k}_{kind}.png" for k in range(settings["views"]) for kind in KINDS]
    return stamp.stat().st_mtime >= newest and all((folder / n).is_file() for n in names)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return line if isinstance(exc, FocusingError) else f"{type(exc).__name__}: {line}".rstrip(": ")


# ---------------------------------------------------------------------------------------------------- the page


def _number(value: str) -> float | None:
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _fmt(value: str | float | None, scale: float = 1.0, digits: int = 4) -> str:
    x = _number(value) if isinstance(value, str) else value
    return "–" if x is None else f"{x * scale:.{digits}f}"


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _anchor(name: str) -> str:
    return "m-" + quote(name, safe="")


METRICS = (("CD ×1e-5", "chamfer", 1e5, 3), ("F@0.005", "fscore", 1.0, 4), ("NC", "normal_consistency", 1.0, 4),
           ("F@0.002", "fscore_fine", 1.0, 4), ("seconds", "seconds", 1.0, 1))
"""(heading, column, scale, digits) of the numbers shown per mesh and per level."""


def _level_key(level: str) -> tuple:
    x = _number(level)
    return (x is None, x or 0.0, level)


def _summary_from_rows(rows: list[dict[str, str]]) -> str:
    """Per (method, resolution, level): mesh count, failures and the means of `METRICS` over the ok meshes."""
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["resolution"], row["level"]), []).append(row)
    head = "".join(f"<th>{h}</th>" for h in ("method", "R", "level", "meshes", "failed"))
    head += "".join(f"<th>{_esc(m[0])}</th>" for m in METRICS)
    body = []
    for (method, res, level), members in sorted(groups.items(), key=lambda g: (g[0][0], _level_key(g[0][1]),
                                                                                  _level_key(g[0][2]))):
        ok = [r for r in members if r["status"] == "ok"]
        cells = [_esc(method), _esc(res), _esc(level or "–"), str(len(members)), str(len(members) - len(ok))]
        for _, column, scale, digits in METRICS:
            values = [x for x in (_number(r[column]) for r in ok) if x is not None]
            cells.append(_fmt(sum(values) / len(values) if values else None, scale, digits))
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _markdown_tables(text: str) -> str:
    """The pipe tables, headings, "- " bullet lists and other lines of a Markdown file as HTML (text escaped,
    nothing else parsed)."""
    parts, table, bullets = [], [], []

    def flush() -> None:
        if bullets:
            parts.append("<ul>" + "".join(f"<li>{_esc(b)}</li>" for b in bullets) + "</ul>")
            bullets.clear()
        if table:
            rows = [[_esc(c.strip()) for c in line.strip().strip("|").split("|")] for line in table]
            rows = [r for r in rows if not all(set(c) <= set(":- ") for c in r)]      # the |---| separator
            head = "".join(f"<th>{c}</th>" for c in rows[0]) if rows else ""
            body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows[1:])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            table.clear()

    for line in text.splitlines():
        if line.lstrip().startswith("|"):
            table.append(line)
            continue
        if line.lstrip().startswith("- "):
            bullets.append(line.lstrip()[2:].strip())
            continue
        flush()
        if line.startswith("#"):
            parts.append(f"<h3>{_esc(line.lstrip('#').strip())}</h3>")
        elif line.strip():
            parts.append(f"<p>{_esc(line.strip())}</p>")
    flush()
    return "\n".join(parts)


def _mesh_section(row: dict[str, str], problem: str | None, views: int) -> str:
    name = row["name"]
    facts = [("method", _esc(row["method"] or "–")), ("R", _esc(row["resolution"] or "–")),
             ("level", _esc(row["level"] or "–")), ("status", _esc(row["status"] or "–"))]
    facts += [(h, _fmt(row[c], s, d)) for h, c, s, d in METRICS]
    facts.insert(6, ("P / R", f"{_fmt(row['precision'])} / {_fmt(row['recall'])}"))
    numbers = "".join(f"<th>{_esc(h)}</th>" for h, _ in facts)
    numbers = f"<table class=numbers><tr>{numbers}</tr><tr>{''.join(f'<td>{v}</td>' for _, v in facts)}</tr></table>"
    parts = [f'<section id="{_anchor(name)}"><h3><a href="#{_anchor(name)}">{_esc(name)}</a></h3>', numbers]
    if row["status"] != "ok":
        parts.append(f"<p class=fail>failed: {_esc(row['error'] or 'no error message')}</p>")
    elif problem is not None:
        parts.append(f"<p class=fail>not rendered: {_esc(problem)}</p>")
    else:
        folder = quote(name, safe="")
        parts.append("<div class=views><span>ground truth</span><span>prediction</span><span>error</span>")
        for k in range(views):
            for kind in KINDS:
                src = f"{folder}/view_{k}_{kind}.png"
                parts.append(f'<a href="{src}"><img src="{src}" alt="{_esc(name)} {kind} view {k}" '
                             f'loading="lazy"></a>')
        parts.append("</div>")
    parts.append("</section>")
    return "\n".join(parts)


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
.fail { color: #a01818; }
nav a { margin-right: 0.8em; white-space: nowrap; }
section { border-top: 1px solid #ddd; margin-top: 1.5em; }
.views { display: grid; grid-template-columns: repeat(3, max-content); gap: 4px; }
.views span { font-weight: bold; }
.views img { width: min(300px, 31vw); height: auto; display: block; border: 1px solid #eee; }
.legend { width: min(512px, 90vw); }
.legend img { width: 100%; height: 14px; display: block; }
.legend div { display: grid; grid-template-columns: 1fr auto 1fr; }
.legend span:last-child { text-align: right; }
"""

SCRIPT = """
// Sets <html data-images="loaded N" | "broken K of N" | "pending"> for automated checks. The fragment
// #load-all-images turns lazy loading off first (a headless browser does not scroll).
(() => {
  const imgs = Array.from(document.images);
  if (location.hash === "#load-all-images") imgs.forEach((img) => { img.loading = "eager"; });
  const mark = () => {
    const done = imgs.filter((img) => img.complete);
    const broken = done.filter((img) => !(img.naturalWidth > 0)).length;
    document.documentElement.dataset.images = done.length < imgs.length ? "pending"
      : (broken ? `broken ${broken} of ${imgs.length}` : `loaded ${imgs.length}`);
  };
  imgs.forEach((img) => { img.addEventListener("load", mark); img.addEventListener("error", mark); });
  mark();
})();
"""


def _page(bench_dir: Path, rows: list[dict[str, str]], problems: dict[int, str], views: int) -> str:
    table_md = bench_dir / "table.md"
    if table_md.is_file():
        summary = _markdown_tables(table_md.read_text(encoding="utf-8", errors="replace"))
        source = "from table.md"
    else:
        summary, source = _summary_from_rows(rows), "means over the ok meshes of results.csv"
    failed = [(r["name"], f"failed: {r['error'] or 'no error message'}") for r in rows if r["status"] != "ok"]
    failed += [(rows[i]["name"], f"not rendered: {p}") for i, p in problems.items() if rows[i]["status"] == "ok"]
    failed_html = "".join(f'<li><a href="#{_anchor(n)}">{_esc(n)}</a>: {_esc(e)}</li>' for n, e in failed)
    nav = " ".join(f'<a href="#{_anchor(r["name"])}">{_esc(r["name"])}</a>' for r in rows)
    title = f"Benchmark report: {_esc(bench_dir.resolve().name)}"
    t = PAPER_THRESHOLD
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{STYLE}</style></head>
<body>
<h1>{title}</h1>
<p>{len(rows)} meshes, {len(rows) - len(failed)} shown, {len(failed)} failed. Pictures: world normals as RGB from
{views} views on an orbit (same cameras for GT and prediction); the error view colours each pixel of the prediction
by its distance to the GT surface. Chamfer distance in 1e-5 units; F-scores at 0.005 and 0.002.</p>
<h2>Summary</h2>
<p>{_esc(source)}</p>
{summary}
<h2>Failed</h2>
{f"<ul class=fail>{failed_html}</ul>" if failed else "<p>none</p>"}
<h2>Error colours</h2>
<div class=legend><img src="legend.png" alt="error colour ramp">
<div><span>0</span><span>{t} (F-score threshold)</span><span>&ge; {2 * t}</span></div></div>
<h2>Meshes</h2>
<nav>{nav}</nav>
{"".join(_mesh_section(r, problems.get(i), views) for i, r in enumerate(rows))}
<script>{SCRIPT}</script>
</body></html>
"""
