"""Text of the report: numbers, intervals and sentences (fmt_*, *_words), and Doc, the block list rendered both
to Markdown and to self-contained HTML.

Pure functions of their arguments: nothing here reads run.json or draws.
"""
from __future__ import annotations

import base64
import html
from typing import Iterable

from report.model import metric_label, num


# ------------------------------------------------------------------------------------------- numbers and words

def fmt_metric(name: str, v: float | None) -> str:
    if v is None:
        return "—"
    if name.startswith(("cer", "wer")):
        return f"{100 * v:.2f} %"
    return f"{v:.4g}"


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def fmt_interval(ci: dict | None) -> str:
    """A change with its interval, in points for rates (cer/wer), e.g. "+0.05 [-0.10, +0.22] pt"."""
    if not ci:
        return "—"
    if str(ci.get("metric", "")).startswith(("cer", "wer")):
        return f"{100 * ci['delta']:+.2f} [{100 * ci['low']:+.2f}, {100 * ci['high']:+.2f}] pt"
    return f"{ci['delta']:+.4g} [{ci['low']:+.4g}, {ci['high']:+.4g}]"


def fmt_change(name: str, v: float | None) -> str:
    """A change against FP32 without an interval, in points for rates."""
    if v is None:
        return "—"
    return f"{100 * v:+.2f} pt" if name.startswith(("cer", "wer")) else f"{v:+.4g}"


def fmt_probe_ratio(st: dict | None) -> str:
    """A paired latency ratio with its standard error, e.g. "0.950 ± 0.010"."""
    return f"{st['median']:.3f} ± {st['se']:.3f}" if isinstance(st, dict) and "median" in st else "—"


def fmt_x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def fmt_pass(v: bool | None) -> str:
    return "—" if v is None else "yes" if v else "NO"


def host_words(host: dict | None) -> str:
    """The int8 ISA flags and library versions of a run's host record (core.host.host_info), in one line."""
    if not host:
        return "not recorded (a run made before hosts were recorded)"
    flags = (host.get("cpu") or {}).get("flags") or {}
    have = [f for f, on in flags.items() if on] or ["none of " + ", ".join(flags)]
    versions = ", ".join(f"{k} {v}" for k, v in (host.get("versions") or {}).items())
    return f"{' '.join(have)}; {versions}"


def stage_words(stage_s: dict) -> str:
    """'calibration 3.6 min, baselines 10.2 min, ...': where the run's wall time went."""
    return ", ".join(f"{name} {float(sec) / 60:.1f} min" for name, sec in stage_s.items())


def criterion_words(crit: dict, threshold: float | None) -> str:
    """The accuracy criterion in one sentence, with its reference and margin when run.json records them."""
    m = crit.get("metric", "?")
    rate = m.startswith(("cer", "wer"))
    ref, delta, kind = num(crit.get("reference")), num(crit.get("delta")), crit.get("kind")
    hi = bool(crit.get("higher_is_better"))
    s = (f"A precision mix passes when its {metric_label(m)} (`{m}`, {'higher' if hi else 'lower'} is better) is at "
         f"{'least' if hi else 'most'} {fmt_metric(m, threshold)}")
    if ref is not None and delta is not None and kind == "absolute":
        margin = f"{100 * delta:.2f} percentage points" if rate else f"{delta:g}"
        s += f": the FP32 reference {fmt_metric(m, ref)} {'minus' if hi else 'plus'} an absolute margin of {margin}"
    elif ref is not None and delta is not None and kind == "relative":
        s += f": the FP32 reference {fmt_metric(m, ref)} {'minus' if hi else 'plus'} a relative margin of {100 * delta:.1f} %"
    s += "."
    rules, weighted = crit.get("set_rules") or {}, crit.get("weighted")
    if isinstance(weighted, dict):
        s += (f" With several evaluation sets that rule applies to their weighted mean: at "
              f"{'least' if hi else 'most'} {fmt_metric(m, num(weighted.get('threshold')))} (from FP32's weighted "
              f"mean {fmt_metric(m, num(weighted.get('reference')))}); the value above is the pooled one.")
    elif rules:
        s += (" With several evaluation sets that rule applies to each set, against FP32's value on it: "
              + ", ".join(f"{n} at {'least' if hi else 'most'} {fmt_metric(m, num(r.get('threshold')))}"
                          for n, r in rules.items()) + "; the value above is the pooled one, for reference.")
    if crit.get("text"):
        s += f' (As stated in the run: "{crit["text"]}".)'
    return s


# ------------------------------------------------------------------------------------ document (md and html)

def _text_cols(headers: list[str]) -> set[int]:
    """Columns aligned left (the first one and the free-text ones); numbers are aligned right."""
    return {0} | {j for j, h in enumerate(headers) if h in ("label", "stage", "set") or h.startswith("same plan")}


class Doc:
    """A tiny block list rendered both to Markdown and to HTML, so the two reports cannot drift apart."""

    def __init__(self) -> None:
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def banner(self, text: str, ok: bool) -> None:
        self.blocks.append(("banner", text, ok))

    def kv(self, items: Iterable[tuple[str, str]]) -> None:
        self.blocks.append(("kv", list(items)))

    def ul(self, items: Iterable[str]) -> None:
        self.blocks.append(("ul", list(items)))

    def table(self, headers: list[str], rows: list[list[str]], highlight: set[int] = frozenset()) -> None:
        self.blocks.append(("table", headers, rows, set(highlight)))

    def img(self, filename: str, alt: str, png: bytes) -> None:
        self.blocks.append(("img", filename, alt, png))

    # -- Markdown
    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                out.append("#" * b[1] + " " + b[2])
            elif kind == "p":
                out.append(b[1])
            elif kind == "banner":
                out.append(f"> **{b[1]}**")
            elif kind == "kv":
                out.append("\n".join(f"- **{k}:** {v}" for k, v in b[1]))
            elif kind == "ul":
                out.append("\n".join(f"- {x}" for x in b[1]) if b[1] else "- (none)")
            elif kind == "table":
                headers, rows, hi = b[1], b[2], b[3]
                cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
                lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
                         "| " + " | ".join("---" if j in _text_cols(headers) else "---:" for j in range(len(headers))) + " |"]
                for i, r in enumerate(rows):
                    cells = [cell(c) for c in r]
                    if i in hi:
                        cells = [f"**{c}**" if c else c for c in cells]
                    lines.append("| " + " | ".join(cells) + " |")
                out.append("\n".join(lines))
            elif kind == "img":
                out.append(f"![{b[2]}]({b[1]})")
        return "\n\n".join(out) + "\n"

    # -- HTML
    @staticmethod
    def _inline(text: str) -> str:
        """Escape, then render `code` spans (the only inline markup the report uses)."""
        parts = html.escape(text).split("`")
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))

    def html(self, title: str) -> str:
        e = self._inline
        body = []
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                body.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif kind == "p":
                body.append(f"<p>{e(b[1])}</p>")
            elif kind == "banner":
                body.append(f'<div class="banner {"ok" if b[2] else "failed"}">{e(b[1])}</div>')
            elif kind == "kv":
                body.append("<ul class=\"kv\">" + "".join(f"<li><b>{e(k)}:</b> {e(v)}</li>" for k, v in b[1]) + "</ul>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in b[1] or ["(none)"]) + "</ul>")
            elif kind == "table":
                headers, rows, hi = b[1], b[2], b[3]
                t = ["<div class=\"tw\"><table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
                left = _text_cols(headers)
                for i, r in enumerate(rows):
                    cls = ' class="hi"' if i in hi else ""
                    t.append(f"<tr{cls}>" + "".join(f'<td class="l">{e(str(c))}</td>' if j in left else f"<td>{e(str(c))}</td>"
                                                    for j, c in enumerate(r)) + "</tr>")
                body.append("".join(t) + "</tbody></table></div>")
            elif kind == "img":
                data = base64.b64encode(b[3]).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{e(b[2])}</figcaption></figure>")
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.3em}h2{font-size:1.25em;margin-top:1.8em}
.banner{padding:.8em 1.1em;border-radius:6px;font-weight:600;font-size:1.1em;margin:1em 0}
.banner.failed{background:#fde2e1;border:2px solid #d62728;color:#8b0000;font-size:1.4em}
.banner.ok{background:#e3f4e3;border:1px solid #2ca02c;color:#1d5e1d}
.tw{overflow-x:auto}table{border-collapse:collapse;font-size:.88em;margin:.6em 0}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td:first-child,th:first-child,td.l{text-align:left}tr.hi td{background:#fff6d5;font-weight:600}
code{background:#f3f3f3;padding:0 .25em;border-radius:3px;font-size:.92em}
figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
ul.kv{list-style:none;padding-left:0}
"""
