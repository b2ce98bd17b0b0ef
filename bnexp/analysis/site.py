"""``make site`` (``bnexp-site``): an offline HTML site of the committed results, for a browser
with no network: ``site/index.html`` (the claims scorecard and the studies) and one page per study
(its report with figures, and a table of its runs whose columns are the settings that differ,
sortable by a click on a header and filtered by setting, each run linked to its config). The
figures and records it shows are copied beside the pages; the script is a few lines of inline
vanilla JS; nothing is fetched from elsewhere.

    bnexp-site                              # results/ -> site/
    bnexp-site --results R --out S --setting synthetic-smoke
"""
from __future__ import annotations

import argparse
import html
import re
import shutil
from pathlib import Path
from urllib.parse import quote

import markdown
import pandas as pd
import yaml

from bnexp import records
from bnexp.analysis import findings
from bnexp.analysis.provenance import CODE_CHECKS
from bnexp.analysis.tables import collect_runs, swept_columns

RUN_METRICS = ("status", "optim.lr", "train_acc", "test_acc", "test_acc.precise", "gen_gap")  # beside the settings
COPIED = ("figures/*.png", "figures/*.pdf", "provenance.json", "verdicts.json", "runs.csv")
STYLE = """body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 6px;
vertical-align:top}th{background:#f0f0f0;cursor:pointer}img{max-width:100%}td img{max-width:180px}
code,pre{background:#f6f6f6}pre{padding:.5em;overflow-x:auto}.label{font-weight:600}nav{margin-bottom:1em}
select{margin:0 .8em .4em 0}"""
# Sort a table by the clicked header (numbers as numbers); filter the runs table by each <select>.
SCRIPT = """document.querySelectorAll('table.sortable th').forEach((th,i)=>th.onclick=()=>{
const tb=th.closest('table').tBodies[0],rows=[...tb.rows],up=th.dataset.up!=='1';th.dataset.up=up?'1':'0';
const v=r=>{const t=r.cells[i].textContent.trim(),n=parseFloat(t);return isNaN(n)?t:n};
rows.sort((a,b)=>{const x=v(a),y=v(b);return (x>y?1:x<y?-1:0)*(up?1:-1)});rows.forEach(r=>tb.appendChild(r))});
const sel=[...document.querySelectorAll('select.filter')];sel.forEach(s=>s.onchange=()=>{
document.querySelectorAll('table.runs tbody tr').forEach(r=>{r.hidden=!sel.every(s=>
s.value===''||r.cells[+s.dataset.col].textContent.trim()===s.value)})});
window.addEventListener('load',()=>{document.documentElement.dataset.brokenImages=
[...document.images].filter(i=>!i.complete||i.naturalWidth===0).length});"""


def build(results: Path, out: Path, setting: str = "fashion_mnist-small") -> list[Path]:
    """Write the site for the ``<setting>`` folders of ``results`` into ``out``; return its pages."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    found = findings.studies(results, setting)
    if (Path(results) / CODE_CHECKS).is_file():  # the reports link it
        shutil.copy(Path(results) / CODE_CHECKS, out / CODE_CHECKS)
    pages = [study_page(rec, out / name) for name, rec in found.items()]
    return [index_page(found, out), *pages]


def page(title: str, body: str, home: str = "") -> str:
    nav = f'<nav><a href="{home}index.html">All studies and the claims</a></nav>' if home else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{nav}{body}<script>{SCRIPT}</script></body></html>\n")


# ----------------------------------------------------------------------------- the index
def index_page(found: dict, out: Path) -> Path:
    """The scorecard (thumbnails and links to the study pages), then one row per study."""
    rows = []
    for r in findings.scorecard_rows(found, _results_of(found)):
        study = r["study"]
        here = study in found
        thumb = (f'<a href="{study}/index.html"><img src="{study}/{_figure_in_study(r["thumb"])}" '
                 f'alt="{html.escape(study)}"></a>') if here and r["thumb"] else ""
        link = f'<a href="{study}/index.html">{study}</a>' if here else f"{study} (not run)"
        rows.append(f"<tr><td>{html.escape(r['claim'])}</td><td class=label>{html.escape(r['label'])}</td>"
                    f"<td>{html.escape(r['headline'])}</td><td>{thumb}</td><td>{link}</td></tr>")
    studies = "".join(f'<tr><td><a href="{n}/index.html">{n}</a></td><td>{html.escape(rec.question)}</td>'
                      f"<td>{len(rec.verdicts or [])}</td></tr>" for n, rec in found.items())
    body = ("<h1>What bnexp found</h1><p>The claims of the BN notes, each with the label its study's "
            "verdict gave, the effect with its 95% interval and the seeds that agree.</p>"
            '<table class="sortable"><thead><tr><th>claim</th><th>label</th><th>headline</th><th>figure</th>'
            f"<th>study</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
            '<h2>Studies</h2><table class="sortable"><thead><tr><th>study</th><th>question</th>'
            f"<th>verdicts</th></tr></thead><tbody>{studies}</tbody></table>")
    path = Path(out) / "index.html"
    path.write_text(page("bnexp results", body))
    return path


def _results_of(found: dict) -> Path:
    """The results folder the study folders lie in (``<results>/<study>/<setting>``)."""
    return next(iter(found.values())).folder.parent.parent if found else Path(".")


def _figure_in_study(thumb: str) -> str:
    """``<study>/<setting>/figures/x.png`` (relative to results) -> ``figures/x.png``."""
    return "/".join(thumb.split("/")[2:])


# ----------------------------------------------------------------------------- a study
def study_page(rec: findings.StudyRecord, out: Path) -> Path:
    """The study's report as HTML, its files copied beside it, and its runs table."""
    out.mkdir(parents=True)
    for pattern in COPIED:
        for f in rec.folder.glob(pattern):
            (out / f.relative_to(rec.folder)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, out / f.relative_to(rec.folder))
    # links between reports (../../<study>/<setting>/report.md) go to that study's page; other
    # links that leave the study's folder (../../...) stay one level up, as the site mirrors it
    report = re.sub(r"\]\(\.\./\.\./([\w-]+)/[\w.-]+/report\.md\)", r"](../\1/index.html)",
                    (rec.folder / "report.md").read_text()).replace("](../../", "](../")
    body = markdown.markdown(report, extensions=["tables", "fenced_code"])
    body = body.replace("<table>", '<table class="sortable">')
    path = out / "index.html"
    path.write_text(page(rec.name, body + "<h2>Runs</h2>" + runs_table(rec.folder, out / "configs"), home="../"))
    return path


def runs_table(folder: Path, config_dir: Path) -> str:
    """The runs table of ``folder``, with its filters: the settings that differ
    between runs (the seed included), then status, lr and the headline metrics, and a link to
    each run's resolved config (written to ``config_dir``)."""
    runs, _ = collect_runs(folder)
    if not len(runs):
        return "<p>No run yet.</p>"
    settings = swept_columns(runs) + (["seed"] if "seed" in runs else [])
    cols = settings + [c for c in RUN_METRICS if c in runs and c not in settings]
    config_dir.mkdir(parents=True, exist_ok=True)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "<th>config</th>"
    body = []
    dirs = {d.name: d for d in records.iter_run_dirs(folder)}
    for _, r in runs.sort_values("run").iterrows():
        config = (records.read_summary(dirs[r["run"]]) or {}).get("config") or {}
        name = f"{r['run']}.yaml"
        (config_dir / name).write_text(yaml.safe_dump(config, sort_keys=False))
        cells = "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in cols)
        body.append(f'<tr>{cells}<td><a href="configs/{quote(name)}">config</a></td></tr>')
    filters = "".join(_filter(runs, c, i) for i, c in enumerate(settings))
    return (f"<p>{len(runs)} runs. Filter: {filters}</p><table class=\"sortable runs\"><thead><tr>{head}"
            f"</tr></thead><tbody>{''.join(body)}</tbody></table>")


def _filter(runs: pd.DataFrame, col: str, i: int) -> str:
    values = sorted({_cell(v) for v in runs[col]}, key=lambda v: (len(v), v))
    options = "".join(f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in values)
    return (f'<label>{html.escape(col)} <select class="filter" data-col="{i}">'
            f'<option value="">all</option>{options}</select></label>')


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(prog="bnexp-site", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="results", help="the results folder (default: ./results)")
    parser.add_argument("--out", default="site", help="where the site goes (default: ./site)")
    parser.add_argument("--setting", default="fashion_mnist-small", help="<data>-<scale> folder name")
    args = parser.parse_args(argv)
    pages = build(Path(args.results), Path(args.out), args.setting)
    print(f"wrote {len(pages)} pages; open {pages[0]}")
    return pages[0]


if __name__ == "__main__":
    main()
