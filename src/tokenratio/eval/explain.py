"""`tokenratio explain`: where the credit goes, token by token, for one preference pair.

Each response token is coloured by its implicit reward beta * r_t = beta * (log pi_theta - log pi_ref)
(green: the policy raised it, red: lowered it); with a TBPO-Q checkpoint the state-baseline head's
b(s_t) is shown too. Token-level methods differ from DPO exactly here: DPO only constrains the sum.
Outputs a self-contained HTML page (no scripts, no external files) and a PNG.
"""

import html
from pathlib import Path

import torch

from tokenratio.atomic import write_text
from tokenratio.batch import collate
from tokenratio.data import load_raw, tokenize_record
from tokenratio.formats import detect_format, to_text
from tokenratio.logprobs import IGNORE_INDEX, token_logps
from tokenratio.modeling import load_pretrained
from tokenratio.scoring import score_batches


@torch.no_grad()
def token_credits(
    model,
    reference,
    tokenizer,
    record: dict,
    fmt: str,
    beta: float,
    head=None,
    max_length: int = 1024,
) -> dict:
    """Per-token implicit rewards (and baseline values) of both responses of one pair."""
    ids = tokenize_record(record, fmt, tokenizer, max_length, max_length - 1)
    batch = collate([ids], tokenizer.pad_token_id)
    batch, ((logits, hidden), (ref_logits, _)) = next(score_batches([model, reference], [batch]))
    labels = batch.labels
    credit = beta * (token_logps(logits.float(), labels) - token_logps(ref_logits.float(), labels))
    baseline = head(hidden.to(next(head.parameters()).dtype)) if head is not None else None
    batch, credit = batch.to("cpu"), credit.cpu()
    baseline = None if baseline is None else baseline.cpu()
    out = {"prompt": to_text(record, fmt, tokenizer)[0], "beta": beta}
    for row, name in enumerate(("chosen", "rejected")):
        mask = batch.labels[row] != IGNORE_INDEX
        tokens = [tokenizer.decode([t]) for t in batch.labels[row][mask].tolist()]
        values = credit[row][mask].tolist()
        base = baseline[row][mask].tolist() if baseline is not None else [None] * len(tokens)
        out[name] = [
            {"token": t, "credit": c, "baseline": b}
            for t, c, b in zip(tokens, values, base, strict=True)
        ]
        out[f"{name}_reward"] = sum(values)
    return out


def _color(value: float, scale: float) -> str:
    alpha = min(1.0, abs(value) / scale) if scale > 0 else 0.0
    rgb = "22,163,74" if value >= 0 else "220,38,38"
    return f"rgba({rgb},{0.08 + 0.72 * alpha:.3f})"


def render_html(credits: dict) -> str:
    """A self-contained page: prompt, then each response with coloured tokens and tooltips."""
    scale = max([abs(t["credit"]) for k in ("chosen", "rejected") for t in credits[k]] or [1.0])

    def spans(tokens):
        parts = []
        for t in tokens:
            tip = f"beta*r_t = {t['credit']:+.4f}"
            if t["baseline"] is not None:
                tip += f"; b(s_t) = {t['baseline']:+.4f}"
            text = html.escape(t["token"]).replace("\n", "&#8629;<br>")
            parts.append(
                f'<span class="tok" style="background:{_color(t["credit"], scale)}" '
                f'title="{tip}">{text}</span>'
            )
        return "".join(parts)

    sections = [
        f"<h2>{name} <small>(sum beta*r_t = {credits[name + '_reward']:+.3f})</small></h2>"
        f'<div class="resp">{spans(credits[name])}</div>'
        for name in ("chosen", "rejected")
    ]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tokenratio explain</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60em; margin: 2em auto; color: #111; }}
.prompt {{ white-space: pre-wrap; color: #555; border-left: 3px solid #ccc; padding-left: 1em; }}
.resp {{ font-family: ui-monospace, monospace; line-height: 1.9; white-space: pre-wrap; }}
.tok {{ border-radius: 3px; padding: 1px 0; }}
.legend span {{ padding: 2px 8px; margin-right: 6px; border-radius: 3px; }}
</style></head><body>
<h1>Per-token credit, beta = {credits["beta"]:g}</h1>
<p class="legend"><span style="background:{_color(scale, scale)}">raised by the policy</span>
<span style="background:{_color(-scale, scale)}">lowered</span> colour scale: |beta*r_t| up to
{scale:.3g}; hover a token for its values.</p>
<div class="prompt">{html.escape(credits["prompt"][-1500:])}</div>
{"".join(sections)}
</body></html>
"""


def render_png(credits: dict, path: Path, width_chars: int = 90, prompt_lines: int = 3) -> None:
    """The same picture as a PNG: the prompt's end, both responses' tokens laid out in lines and
    coloured by credit, a legend and the colour scale."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap, Normalize

    scale = max([abs(t["credit"]) for k in ("chosen", "rejected") for t in credits[k]] or [1.0])
    prompt = textwrap.wrap(" ".join(credits["prompt"].split()), width_chars)[-prompt_lines:]
    lines = [[("prompt (its end):", None)], *[[(line, "prompt")] for line in prompt]]
    for name in ("chosen", "rejected"):
        lines.append([(f"{name} (sum beta*r_t = {credits[name + '_reward']:+.3f})", None)])
        row, used = [], 0
        for t in credits[name]:
            text = t["token"].replace("\n", " ")
            if used + len(text) > width_chars and row:
                lines.append(row)
                row, used = [], 0
            row.append((text, t["credit"]))
            used += len(text)
        lines.append(row)
    legend = (
        f"green: raised by the policy over the reference, red: lowered (beta = {credits['beta']:g})"
    )
    lines.append([(legend, "prompt")])
    height = 0.3 * (len(lines) + 2) + 0.4
    fig = plt.figure(figsize=(width_chars * 0.09, height))
    for i, row in enumerate(lines):
        x, y = 0.01, 1 - (i + 1) / (len(lines) + 3)
        for text, value in row:
            box = (
                None
                if value in (None, "prompt")
                else {"facecolor": _rgba(value, scale), "pad": 1, "edgecolor": "none"}
            )
            style = {None: ("bold", "black"), "prompt": ("normal", "dimgray")}.get(
                value if value in (None, "prompt") else "", ("normal", "black")
            )
            fig.text(x, y, text, family="monospace", fontsize=9, bbox=box, weight=style[0],
                     color=style[1])  # fmt: skip
            x += len(text) / (width_chars * 1.05)
    bar = fig.add_axes((0.3, 0.4 / height, 0.4, 0.12 / height))
    cmap = LinearSegmentedColormap.from_list(
        "credit", [_rgba(-scale, scale), (1, 1, 1, 1), _rgba(scale, scale)]
    )
    colorbar = fig.colorbar(
        plt.cm.ScalarMappable(Normalize(-scale, scale), cmap), cax=bar, orientation="horizontal"
    )
    colorbar.set_label("credit beta * r_t (nats)", fontsize=8)
    colorbar.ax.tick_params(labelsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rgba(value: float, scale: float) -> tuple:
    alpha = 0.08 + 0.72 * (min(1.0, abs(value) / scale) if scale > 0 else 0.0)
    return (0.09, 0.64, 0.29, alpha) if value >= 0 else (0.86, 0.15, 0.15, alpha)


def read_record(data: str, index: int, on_invalid: str = "error"):
    """Record `index` of `data` (counting valid records; with on_invalid "error" a bad record
    before it stops), with a loud line when it is in the training data of the run `model_path`
    came from. Read before any model loads."""
    raw = load_raw(data, on_invalid=on_invalid, limit=index + 1)
    if index >= len(raw.dataset):
        raise ValueError(f"--index {index}: {data} has {len(raw.dataset)} valid records")
    if raw.skipped:
        print(f"explain: skipped {len(raw.skipped)} invalid records (first: {raw.skipped[0][1]})")
    return raw.select([index])


def explain(model_path: str, reference_path: str, raw, beta: float, out: Path) -> dict:
    """Load, compute, write explain.html and explain.png into `out`; return the credits.
    `raw`: the one record (`read_record`)."""
    model, tokenizer, head = load_pretrained(model_path)
    reference = load_pretrained(reference_path)[0]
    record = raw.dataset[0]
    credits = token_credits(model, reference, tokenizer, record, detect_format(record), beta, head)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "explain.html", render_html(credits))
    render_png(credits, out / "explain.png")
    return credits
