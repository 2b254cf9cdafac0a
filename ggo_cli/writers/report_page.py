"""The fixed parts of ``report.html``: its style sheet, its script and the page around the table.

The page must work from a file share with no network: everything it needs is inline (no
CDN, no web fonts), and its Content-Security-Policy allows nothing else: no connection, no
frame, no form, only this style sheet and this script (by their SHA-256), and images from the
page's own folder. The script is plain JavaScript (no library): it sorts the table when a
column's header is clicked (numbers as numbers, empty cells last in both directions) and
filters its rows by a text box and a status selector.

The run's summary comes from ``run_manifest.json`` (:mod:`ggo_cli.run.manifest`), read
defensively: a field that is missing or of another type shows as empty. Nothing from the
manifest is shown without :func:`html.escape`, and neither the model's path nor the host is shown.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

PAGE_STYLE = """
:root { color-scheme: light; --line: #d0d4da; --muted: #5b6470; --head: #eef1f5; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  margin: 1.2rem; color: #1c2128; background: #fff; }
h1 { font-size: 1.4rem; margin: 0 0 .2rem; }
h2 { font-size: 1.1rem; margin: 1.2rem 0 .4rem; }
.note { color: var(--muted); margin: .2rem 0; }
.warn { background: #fff4d6; border: 1px solid #e8c66a; padding: .3rem .6rem; }
dl.summary { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem;
  margin: .4rem 0; }
dl.summary dt { font-weight: 600; }
dl.summary dd { margin: 0; }
ul.failures { margin: .2rem 0; padding-left: 1.2rem; }
.controls { display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; margin: .5rem 0; }
table { border-collapse: collapse; width: 100%; }
th, td { border: 1px solid var(--line); padding: .25rem .4rem; vertical-align: top; }
thead th { background: var(--head); position: sticky; top: 0; text-align: left; }
th button { font: inherit; font-weight: 600; border: 0; background: none; padding: 0;
  cursor: pointer; text-align: left; }
th[aria-sort="ascending"] button::after { content: " \\25B2"; }
th[aria-sort="descending"] button::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.msg { min-width: 14rem; max-width: 28rem; overflow-wrap: anywhere; }
td.files { min-width: 6.5rem; }
td[data-col="series_instance_uid"] { white-space: nowrap; }
tr[data-status="failed"] td { background: #fdecec; }
tr[data-status="skipped"] td, tr[data-status="pending"] td { color: var(--muted); }
.status { font-weight: 600; }
.flag { display: inline-block; background: #fff0c2; border-radius: 3px; padding: 0 .3rem;
  margin: 0 .2rem .1rem 0; font-size: .85em; }
.trend-increased { color: #b3261e; font-weight: 600; }
.trend-decreased { color: #1e7b34; font-weight: 600; }
.files img { height: 64px; display: block; }
.files details { margin-top: .2rem; }
.files details a { margin-right: .3rem; }
@media print { .controls, th button::after { display: none; } thead th { position: static; } }
"""

PAGE_SCRIPT = """
(function () {
  "use strict";
  var table = document.getElementById("series-table");
  var text = document.getElementById("filter-text");
  var status = document.getElementById("filter-status");
  var shown = document.getElementById("shown-count");
  if (!table || !text || !status || !shown) { return; }
  var body = table.tBodies[0];
  function rows() { return Array.prototype.slice.call(body.rows); }
  function filter() {
    var needle = text.value.trim().toLowerCase();
    var wanted = status.value;
    var count = 0;
    rows().forEach(function (row) {
      var visible = (wanted === "" || row.getAttribute("data-status") === wanted) &&
        (needle === "" || row.textContent.toLowerCase().indexOf(needle) !== -1);
      row.hidden = !visible;
      if (visible) { count += 1; }
    });
    shown.textContent = String(count);
  }
  function sortKey(row, index, numeric) {
    var cell = row.cells[index];
    var raw = cell ? cell.getAttribute("data-v") : null;
    if (raw === null || raw.trim() === "") { return null; }
    if (numeric) {
      var value = parseFloat(raw.trim().replace(/^'/, ""));
      return isFinite(value) ? value : null;
    }
    return raw.toLowerCase();
  }
  function sortBy(header) {
    var index = header.cellIndex;
    var numeric = header.getAttribute("data-type") === "number";
    var ascending = header.getAttribute("aria-sort") !== "ascending";
    Array.prototype.forEach.call(header.parentNode.cells, function (cell) {
      cell.removeAttribute("aria-sort");
    });
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var keyed = rows().map(function (row) {
      return { row: row, key: sortKey(row, index, numeric),
               order: Number(row.getAttribute("data-i")) };
    });
    keyed.sort(function (a, b) {
      if (a.key === null || b.key === null) {
        if (a.key === b.key) { return a.order - b.order; }
        return a.key === null ? 1 : -1;
      }
      var c = a.key < b.key ? -1 : (a.key > b.key ? 1 : 0);
      return (ascending ? c : -c) || a.order - b.order;
    });
    keyed.forEach(function (item) { body.appendChild(item.row); });
  }
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (header) {
    var button = header.querySelector("button");
    if (button) { button.addEventListener("click", function () { sortBy(header); }); }
  });
  text.addEventListener("input", filter);
  status.addEventListener("change", filter);
  filter();
})();
"""

STATUS_CHOICES = ("ok", "skipped", "failed", "pending")
"""The statuses the selector always offers (others found in the CSV are added after them)."""


def _digest(source: str) -> str:
    """The CSP source expression of an inline element's exact text."""
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def content_policy() -> str:
    """The page's Content-Security-Policy: nothing but its own style, script and images."""
    return (
        "default-src 'none'; "
        f"style-src {_digest(PAGE_STYLE)}; "
        f"script-src {_digest(PAGE_SCRIPT)}; "
        "img-src 'self' file:; base-uri 'none'; form-action 'none'"
    )


def _get(document: Mapping[str, Any] | None, *keys: str) -> Any:
    """``document[k1][k2]...``, or ``None`` where a level is missing or not an object."""
    value: Any = document
    for key in keys:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _text(value: Any) -> str:
    """A manifest value as escaped text (``None`` as empty)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return escape(str(value), quote=True)


def _seconds(value: Any) -> str:
    """A duration in seconds, rounded for reading."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.1f} s"
    return ""


def _device(manifest: Mapping[str, Any]) -> str:
    """Where the run ran: device used (and asked for), precision, int8 recipe, processes."""
    used = _text(_get(manifest, "device", "used"))
    requested = _get(manifest, "device", "requested")
    parts = [used + (f" (asked: {_text(requested)})" if requested and requested != used else "")]
    precision = _text(_get(manifest, "device", "precision"))
    recipe = _text(_get(manifest, "device", "int8_recipe"))
    if precision:
        parts.append(f"precision {precision}" + (f", recipe {recipe}" if recipe else ""))
    jobs = _get(manifest, "device", "jobs")
    if isinstance(jobs, int) and jobs > 1:
        parts.append(f"{jobs} processes")
    return "; ".join(p for p in parts if p)


def _variant_check(manifest: Mapping[str, Any]) -> str:
    """The model variant's self-check verdict in one line (empty when none ran)."""
    check = _get(manifest, "device", "variant_check")
    if not isinstance(check, Mapping):
        return ""
    verdict = "passed" if check.get("passed") else ("failed" if check.get("ran") else "not run")
    return f"{_text(check.get('variant'))}: {verdict}. {_text(check.get('reason'))}".strip()


def _counts(manifest: Mapping[str, Any]) -> str:
    """The run's series counts."""
    counts = _get(manifest, "counts")
    if not isinstance(counts, Mapping):
        return ""
    names = ("series", "ok", "skipped", "failed", "pending", "unchanged", "slices_segmented")
    return ", ".join(
        f"{_text(name.replace('_', ' '))} {_text(counts[name])}" for name in names if name in counts
    )


def _flags(manifest: Mapping[str, Any]) -> str:
    """The quality flags raised, with how many series each."""
    flags = _get(manifest, "qc_flag_counts")
    if not isinstance(flags, Mapping):
        return ""
    raised = [(name, n) for name, n in flags.items() if isinstance(n, int) and n > 0]
    return ", ".join(f"{_text(name)} {n}" for name, n in raised) or "none"


def _reason(series: Mapping[str, Any]) -> str:
    """A failed series' message without the ``series <UID>: `` it often starts with."""
    message = str(series.get("message") or "")
    return message.removeprefix(f"series {series.get('series_instance_uid')}: ")


def _failures(manifest: Mapping[str, Any]) -> str:
    """The run's failed series with their reasons, as a list (empty when none failed)."""
    series = _get(manifest, "series")
    if not isinstance(series, Sequence):
        return ""
    items = [
        f"<li>series <code>{_text(one.get('series_instance_uid'))}</code>: "
        f"{_text(_reason(one)) or 'no reason recorded'}</li>"
        for one in series
        if isinstance(one, Mapping) and one.get("status") == "failed"
    ]
    return f'<ul class="failures">{"".join(items)}</ul>' if items else ""


def render_summary(manifest: Mapping[str, Any] | None, notes: Sequence[str]) -> str:
    """The run's summary: times, versions, model, device, counts, flags, failures.

    Args:
        manifest: the parsed ``run_manifest.json``, or ``None`` when there is none.
        notes: plain-text remarks shown first (escaped here), e.g. why the manifest is missing.

    Returns:
        HTML for the summary section.
    """
    parts = ['<section id="summary"><h2>Last run</h2>']
    parts += [f'<p class="note warn">{escape(note, quote=True)}</p>' for note in notes]
    if manifest is not None:
        model = " ".join(
            t for t in (_text(_get(manifest, "model", k)) for k in ("name", "version")) if t
        )
        fields = (
            ("Started", _text(manifest.get("started_at"))),
            ("Finished", _text(manifest.get("finished_at"))),
            ("Run time", _seconds(_get(manifest, "timings_s", "total"))),
            ("ggo-cli", _text(_get(manifest, "versions", "ggo-cli"))),
            ("Model", model),
            ("Device", _device(manifest)),
            ("Variant check", _variant_check(manifest)),
            ("Series", _counts(manifest)),
            ("Quality flags", _flags(manifest)),
        )
        items = "".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in fields if value)
        parts.append(f'<dl class="summary" id="run-summary">{items}</dl>')
        failures = _failures(manifest)
        if failures:
            parts.append(f'<h2>Failed series</h2><div id="failures">{failures}</div>')
    parts.append("</section>")
    return "".join(parts)


def render_controls(statuses: Sequence[str], total: int) -> str:
    """The text filter, the status selector and the count of rows shown."""
    choices = list(STATUS_CHOICES) + sorted(set(statuses) - set(STATUS_CHOICES))
    options = "".join(
        f'<option value="{escape(s, quote=True)}">{escape(s, quote=True)}</option>'
        for s in choices
    )
    return (
        '<div class="controls">'
        '<label>Filter <input type="search" id="filter-text" '
        'placeholder="text in any column"></label>'
        f'<label>Status <select id="filter-status"><option value="">all</option>{options}'
        "</select></label>"
        f'<span><span id="shown-count">{total}</span> of {total} series shown</span></div>'
    )


def render_page(*, generated_at: str, summary: str, controls: str, table: str) -> str:
    """The whole page around its parts (each already escaped HTML).

    Args:
        generated_at: when the page was built (UTC, ISO 8601).
        summary: :func:`render_summary`'s HTML.
        controls: :func:`render_controls`'s HTML.
        table: the series table's HTML.

    Returns:
        The HTML document.
    """
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{content_policy()}">'
        '<meta name="referrer" content="no-referrer">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>ggo-cli report</title>"
        f"<style>{PAGE_STYLE}</style></head>\n<body>"
        "<header><h1>ggo-cli report</h1>"
        '<p class="note">Research use only: outputs are not a diagnosis. '
        f"Built {escape(generated_at, quote=True)} from ggo_volumes.csv and "
        "run_manifest.json.</p></header>\n"
        f"{summary}\n"
        f'<section id="results"><h2>Series</h2>{controls}\n{table}</section>\n'
        f"<script>{PAGE_SCRIPT}</script>\n</body></html>\n"
    )
