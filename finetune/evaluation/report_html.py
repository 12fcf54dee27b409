"""``eval/report.html``: one self-contained file (styles and images inline) that a person opens to see how a model
did: the headline (KID), the metric table with intervals and which direction is better, extra metric blocks, the
images per prompt side by side, and the training loss curve.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any, Optional

from PIL import Image

REFERENCE_SHOWN = 24
THUMB = 256   # longest side of an embedded image; tiny images are enlarged (pixelated) by the page instead

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;
color:#1d2327;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde;padding-bottom:4px}
h3{font-size:14px;margin:18px 0 6px;font-weight:600}
.sub{color:#5a6470;margin:0 0 14px}.mono{font-family:ui-monospace,Menlo,monospace;font-size:12px}
.headline{display:flex;gap:16px;flex-wrap:wrap;margin:12px 0}
.card{border:1px solid #d0d7de;border-radius:8px;padding:10px 14px;min-width:220px;background:#f8fafc}
.card .v{font-size:22px;font-weight:600}.card .ci{color:#5a6470;font-size:12px}
.verdict{padding:10px 14px;border-radius:8px;margin:8px 0;font-weight:600}
.good{background:#e6f4ea;color:#1e6b34}.noise{background:#f1f3f5;color:#44505c}.bad{background:#fdecea;color:#8a1c13}
.notes{background:#fff8e1;border:1px solid #f0d98c;border-radius:8px;padding:8px 14px;margin:12px 0}
.notes li{margin:2px 0}
table{border-collapse:collapse;width:100%;margin:6px 0}th,td{border-bottom:1px solid #e4e7eb;padding:6px 8px;
text-align:left;vertical-align:top}th{background:#f3f5f7;font-weight:600;font-size:13px}
td.num{font-variant-numeric:tabular-nums;white-space:nowrap}.ci{color:#6b7580;font-size:12px}
.small{color:#6b7580;font-size:12px}.nc{color:#8a6d00;font-style:italic}
.win{color:#1e6b34;font-weight:600}.lose{color:#8a1c13}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:18px}.pair>div{border:1px solid #e4e7eb;border-radius:8px;
padding:8px}.grid{display:flex;flex-wrap:wrap;gap:6px}.grid figure{margin:0;text-align:center}
.grid img{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;border:1px solid #ccd;
background:#fff}.grid figcaption{font-size:11px;color:#6b7580}
.curve img{max-width:100%;border:1px solid #e4e7eb;border-radius:6px}
"""


def fmt(x: Optional[float]) -> str:
    """A number as people read it: 3 significant digits, no exponent for the usual metric ranges."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    ax = abs(x)
    if ax == 0:
        return "0"
    if ax >= 100:
        return f"{x:.1f}"
    if ax >= 0.001:
        return f"{x:.3g}" if ax < 1 else f"{x:.3f}".rstrip("0").rstrip(".")
    return f"{x:.2e}"


def _e(text: Any) -> str:
    return html.escape(str(text))


def data_uri(path: Path, max_side: Optional[int] = THUMB) -> Optional[str]:
    """An image file as a data: URI (images larger than ``max_side`` shrunk and sent as JPEG)."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            fmt_, mime = "PNG", "image/png"
            if max_side and max(im.size) > max_side:
                im.thumbnail((max_side, max_side))
                fmt_, mime = "JPEG", "image/jpeg"
            buf = io.BytesIO()
            im.save(buf, format=fmt_, quality=88)
    except (OSError, ValueError):
        return None
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _cell(v: Optional[dict[str, Any]]) -> str:
    if not v or v.get("value") is None:
        return '<td class="num">–</td>'
    ci = f'<br><span class="ci">[{fmt(v["low"])}, {fmt(v["high"])}]</span>' if v.get("low") is not None else ""
    return f'<td class="num">{fmt(v["value"])}{ci}</td>'


def _verdict_cell(m: dict[str, Any], titles: dict[str, str]) -> str:
    v = m.get("verdict") or {}
    if not v.get("better"):
        return f'<td>{_e(v.get("text", "–"))}</td>'
    who = titles.get(v["better"], v["better"])
    cls = "win" if v["decisive"] else ""
    extra = "outside the 95% interval" if v["decisive"] else "within noise"
    overlap = "" if v.get("overlap") is None else ("; the two intervals overlap" if v["overlap"]
                                                    else "; the two intervals do not overlap")
    return f'<td><span class="{cls}">{_e(who)}</span> <span class="small">({extra}{overlap})</span></td>'


def metric_table(data: dict[str, Any]) -> str:
    a, b = list(data["models"])
    titles = {k: v["title"] for k, v in data["models"].items()}
    rows = []
    for key, m in data["metrics"].items():
        decides = (data.get("decision") or {}).get("by", data.get("headline"))
        label = _e(m["label"]) + (" <b>(headline)</b>" if key == decides else "")
        better = f'<span class="small">{_e(m["better_text"])}</span>'
        if not m["computed"]:
            rows.append(f'<tr><td>{label}<br>{better}</td><td colspan="5" class="nc">{_e(m["reason"])}</td></tr>')
            continue
        note = f'<br><span class="small">{_e(m["note"])}</span>' if m.get("note") else ""
        d = m["difference"]
        diff = (f'<td class="num">{fmt(d["value"])}<br><span class="ci">[{fmt(d["low"])}, {fmt(d["high"])}]'
                f'</span></td>') if d and d.get("value") is not None else '<td class="num">–</td>'
        ref = _cell(m["values"].get("reference"))
        rows.append(f"<tr><td>{label}<br>{better}{note}</td>{_cell(m['values'][a])}{_cell(m['values'][b])}{ref}"
                    f"{diff}{_verdict_cell(m, titles)}</tr>")
    head = (f"<tr><th>metric</th><th>{_e(titles[a])}</th><th>{_e(titles[b])}</th><th>reference images</th>"
            f"<th>difference {_e(b)} − {_e(a)}<br><span class='small'>(of distances to the reference for "
            f"descriptors)</span></th><th>better</th></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def extra_block(block: dict[str, Any], data: dict[str, Any]) -> str:
    """An optional metric block (see finetune.evaluation.evaluate.ExtraMetric): one row per column of per-image scores."""
    a, b = list(data["models"])
    titles = {k: v["title"] for k, v in data["models"].items()}
    rows = []
    for col, row in block["rows"].items():
        d = row["difference"]
        diff = f'<td class="num">{fmt(d["value"])}<br><span class="ci">[{fmt(d["low"])}, {fmt(d["high"])}]</span></td>'
        rows.append(f"<tr><td>{_e(col)}</td><td class='num'>{fmt(row.get('level'))}</td>"
                    f"{_cell(row.get('reference_images'))}{_cell(row['values'][a])}{_cell(row['values'][b])}"
                    f"{diff}{_verdict_cell(row, titles)}</tr>")
    n = next(iter(block["rows"].values()))["n"].get("judged", "?")
    head = (f"<tr><th>{_e(block['title'].split(' (')[0].lower())}</th><th>{_e(block['level_label'])}</th>"
            f"<th>reference images</th><th>{_e(titles[a])}</th><th>{_e(titles[b])}</th>"
            f"<th>difference</th><th>better</th></tr>")
    mark = " (headline)" if (data.get("decision") or {}).get("by") == block.get("key") else ""
    return (f"<h2>{_e(block['title'] + mark)}</h2><p class='small'>{_e(block['note'])}; {n} images judged per model; "
            f"{_e(block['better'])} is better.</p><table>{head}{''.join(rows)}</table>")


def headline(data: dict[str, Any]) -> str:
    """The decision's lines first (caption following when the checker judged the prompts, else KID), then KID's
    cards; a finding within noise says so."""
    from finetune.evaluation.stats import decision as decide

    d = data.get("decision") or decide(data)
    if d["by"] != "kid":
        cls = "noise" if not d["better"] else ("good" if d["better"] == list(data["models"])[1] else "bad")
        rest = "".join(f'<div class="verdict noise">{_e(line)}</div>' for line in d["lines"][1:])
        return f'<div class="verdict {cls}">{_e(d["lines"][0])}</div>{_kid_headline(data)}{rest}'
    return _kid_headline(data, verdict=True)


def _kid_headline(data: dict[str, Any], verdict: bool = False) -> str:
    key = data["headline"]
    m = data["metrics"][key]
    titles = {k: v["title"] for k, v in data["models"].items()}
    cards = []
    for k in data["models"]:
        v = m["values"][k]
        cards.append(f'<div class="card"><div class="small">{_e(m["label"])} · {_e(titles[k])}</div>'
                     f'<div class="v">{fmt(v["value"])}</div><div class="ci">95% interval [{fmt(v["low"])}, '
                     f'{fmt(v["high"])}] · n = {m["n"].get("generated", "?")}</div></div>')
    v = m["verdict"]
    cls = "noise" if not v["better"] or not v["decisive"] else (
        "good" if v["better"] == list(data["models"])[1] else "bad")
    who = titles.get(v["better"], "neither") if v["better"] else "neither"
    text = (f"{m['label']} ({m['better_text']}): {who} is better, and the difference is outside its 95% interval."
            if v["decisive"] else f"{m['label']} ({m['better_text']}): {who} scores better, but the difference is "
                                  "within noise (its 95% interval includes 0).") if v["better"] else v["text"]
    cards_html = f'<div class="headline">{"".join(cards)}</div>'
    return cards_html + (f'<div class="verdict {cls}">{_e(text)}</div>' if verdict else "")


def image_grids(data: dict[str, Any]) -> str:
    gen = data["generation"]
    titles = {k: v["title"] for k, v in data["models"].items()}
    parts = []
    for p, prompt in enumerate(gen["prompts"]):
        cols = []
        for k in data["models"]:
            figs = []
            for img in data["images"][k]:
                if img["prompt_index"] != p:
                    continue
                uri = data_uri(Path(img["file"]))
                src = f'<img src="{uri}" alt="{_e(k)} seed {img["seed"]}">' if uri else "<i>missing</i>"
                figs.append(f'<figure>{src}<figcaption>seed {img["seed"]}</figcaption></figure>')
            cols.append(f'<div><b>{_e(titles[k])}</b><div class="grid">{"".join(figs)}</div></div>')
        parts.append(f'<h3>“{_e(prompt)}”</h3><div class="pair">{"".join(cols)}</div>')
    ref = data["reference"]
    root = Path(ref["root"]) if ref.get("root") else None
    figs = []
    for rel in ref["files"][:REFERENCE_SHOWN]:
        uri = data_uri(root / rel) if root else None
        if uri:
            figs.append(f'<figure><img src="{uri}" alt="reference {_e(rel)}"><figcaption>{_e(rel)}</figcaption>'
                        "</figure>")
    if figs:
        more = f" (the first {REFERENCE_SHOWN} of {ref['n']})" if ref["n"] > REFERENCE_SHOWN else ""
        parts.append(f'<h3>Reference images{more}</h3><div class="grid">{"".join(figs)}</div>')
    return "".join(parts)


def loss_curves(data: dict[str, Any]) -> str:
    curves = []
    if data.get("loss_curve"):
        curves.append(("training loss", data["loss_curve"]))
    for k, run in (data.get("runs") or {}).items():
        curves.append((f"training loss of {data['models'][k]['title']}", str(Path(run) / "loss_curve.png")))
    out = []
    for title, path in curves:
        uri = data_uri(Path(path), max_side=None) if Path(path).is_file() else None
        body = f'<img src="{uri}" alt="{_e(title)}">' if uri else f"<p class='small'>no loss curve at {_e(path)}</p>"
        out.append(f'<h3>{_e(title)}</h3><div class="curve">{body}</div>')
    return "<h2>Training</h2>" + "".join(out) if out else ""


def write_report(data: dict[str, Any]) -> str:
    """The whole report page as a string (the caller writes it atomically)."""
    gen, fe, boot = data["generation"], data["feature_extractor"], data["bootstrap"]
    a, b = list(data["models"])
    if data["kind"] == "eval":
        title = f"Evaluation of {Path(data['run']).name}"
        sub = "the fine-tuned model against its base, on the same prompts and seeds"
    else:
        title = f"Comparison: {data['models'][a]['title']} vs {data['models'][b]['title']}"
        sub = "two fine-tuned runs on the same prompts and seeds (A: champion, B: challenger)"
    models = "".join(f"<li><b>{_e(m['title'])}</b>: base <span class='mono'>{_e(m['base_model'])}</span>"
                     + (f", LoRA <span class='mono'>{_e(m['lora'])}</span> (sha256 {_e(m['lora_sha256'][:12])})"
                        if m.get("lora") else " (no LoRA)") + "</li>" for m in data["models"].values())
    settings = (f"{gen['n']} images per model over {len(gen['prompts'])} prompt(s) ({_e(gen['prompt_source'])}); "
                f"{gen['steps']} steps of {_e(gen['scheduler'])}, guidance {gen['guidance']:g}, "
                f"{gen['resolution']} px; reference: {data['reference']['n']} images from "
                f"{_e(data['reference']['source'])}")
    notes = "".join(f"<li>{_e(n)}</li>" for n in data.get("notes", []))
    extras = "".join(extra_block(blk, data) for blk in data.get("extra", []))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{_e(title)}</title><style>{CSS}</style></head><body>
<h1>{_e(title)}</h1><p class="sub">{_e(sub)} · {_e(data['created'])}</p>
<ul class="small">{models}</ul><p class="small">{settings}</p>
{headline(data)}
<div class="notes"><ul>{notes}</ul></div>
<h2>Metrics</h2>
<p class="small">Each value with its bootstrap 95% interval ({boot['resamples']} resamples over images); the
difference is paired (same prompts and seeds) and gets its own interval: outside it means the models differ beyond
sampling noise.</p>
{metric_table(data)}
{extras}
<h2>Images per prompt</h2>
<p class="small">Same seed, same position: the only difference between the columns is the model.</p>
{image_grids(data)}
{loss_curves(data)}
<h2>How this was measured</h2>
<ul class="small"><li>Features: {_e(fe['name'])}, {fe['num_features']}-d, sha1 <span class="mono">{_e(fe['sha1'])}
</span>; input {_e(fe['input'])}.</li><li>Bootstrap: {_e(boot['method'])}.</li>
<li>Everything on this page is in <span class="mono">eval.json</span> beside it (schema {_e(data['schema'])}
v{data['schema_version']}).</li></ul>
</body></html>
"""
