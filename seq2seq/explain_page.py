"""`run.py explain`: one self-contained HTML page (PNGs beside it) that walks through attention on the
user's sentence, step by step, at a layer, head and kind they pick (seq2seq/explain.py computes it)."""
import base64
import html
from pathlib import Path

from omegaconf import DictConfig

from seq2seq import Seq2SeqError
from seq2seq.explain import AttentionSteps, attention_module, attention_steps, head_importance, top_predictions
from seq2seq.plots import heat_map


def explain(cfg: DictConfig) -> None:
    from seq2seq.config import check_choice, check_flag, search_config
    from seq2seq.translator import Translator

    search = search_config(cfg)
    check_flag("pretokenized", cfg.pretokenized)
    check_choice("kind", cfg.kind, ("encoder", "decoder", "cross"))
    translator = Translator.from_checkpoint(cfg.ckpt, device=search.device)
    model, tokenizer = translator.model, translator.tokenizer
    limit = model.cfg.max_len - 1
    src_ids = tokenizer.encode(translator.prepare([str(cfg.text)], cfg.pretokenized))[0][:limit]
    if not src_ids:
        raise Seq2SeqError("text is empty: give a sentence, text=\"The cat sat on the mat.\"")
    if cfg.target is not None:
        tgt_ids = tokenizer.encode(translator.prepare([str(cfg.target)], cfg.pretokenized, side="tgt"))[0][:limit]
    else:
        tgt_ids = translator.best_ids(src_ids, search)
    try:
        heads = [attention_steps(model, tokenizer, src_ids, tgt_ids, cfg.layer, h, cfg.kind)
                 for h in range(attention_module(model, cfg.kind, cfg.layer).n_heads)]
    except ValueError as e:
        raise Seq2SeqError(str(e)) from None
    if not 0 <= cfg.head < len(heads):
        raise Seq2SeqError(f"head={cfg.head}: this model has heads 0..{len(heads) - 1}")
    labels, drops = head_importance(model, src_ids, tgt_ids)
    predictions = top_predictions(model, tokenizer, src_ids, tgt_ids)
    out = Path(cfg.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Seq2SeqError(f"{out}: cannot create ({e.strerror or e})") from None
    write_page(out, heads, cfg.head, labels, drops, predictions, tokenizer.pieces(tgt_ids) + ["</s>"])
    print(f"wrote {out}/explain.html and its PNGs")


def pictures(out: Path, heads: list[AttentionSteps], head: int, labels, drops, targets) -> dict[str, Path]:
    """The PNGs of the page: one per step of the chosen head, the heads side by side, the ablation map."""
    s = heads[head]
    where = f"{s.kind}, layer {s.layer}, head {s.head}"
    paths = {name: out / f"{name}.png" for name in ("scores", "mask", "masked", "weights", "contributions",
                                                     "importance")}
    heat_map(s.scores, s.queries, s.keys, f"2. scores q·k/√d, before the mask ({where})", paths["scores"],
             cmap="RdBu_r")
    heat_map(s.keep.float(), s.queries, s.keys, "3a. the mask: 1 = may look, 0 = hidden", paths["mask"], 0, 1, "Greys")
    heat_map(s.masked, s.queries, s.keys, "3b. scores after the mask (hidden = -inf, grey)", paths["masked"],
             cmap="RdBu_r")
    heat_map(s.weights, s.queries, s.keys, "3c. softmax weights (each row sums to 1)", paths["weights"], 0, 1)
    heat_map(s.contributions, s.queries, s.keys, "4. weight × ‖value W_O‖: what each key moved", paths["contributions"])
    for h in heads:
        paths[f"head{h.head}"] = out / f"head{h.head}.png"
        heat_map(h.weights, h.queries, h.keys, f"head {h.head}: weights", paths[f"head{h.head}"], 0, 1)
    heat_map(drops, labels, targets, "drop in log P(reference token) with the head switched off",
             paths["importance"], cmap="RdBu_r", vmin=-float(drops.abs().max()), vmax=float(drops.abs().max()))
    return paths


def image(path: Path) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" alt="{path.stem}">'


def table(header: list[str], rows: list[list]) -> str:
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows) + "</table>")


def write_page(out: Path, heads: list[AttentionSteps], head: int, labels, drops, predictions, targets) -> None:
    from seq2seq.files import write_text

    s = heads[head]
    img = pictures(out, heads, head, labels, drops, targets)
    worst = drops.mean(dim=1).argsort(descending=True)[:8].tolist()
    sections = [
        ("1. Tokens become vectors", table(["piece", "‖embedding·√d + position‖"],
                                            [[q, n] for q, n in zip(s.queries, s.embedding_norms.tolist())])),
        ("2. Queries and keys score relevance by dot product", image(img["scores"])),
        ("3. Softmax and masks turn scores into weights", image(img["mask"]) + image(img["masked"])
         + image(img["weights"])),
        ("4. Values move information: the update ‖Δx‖ each query receives",
         table(["query", "‖Δx‖ (whole layer)", "‖Δx‖ (this head)"],
               [[q, u, h] for q, u, h in zip(s.queries, s.update.norm(dim=-1).tolist(),
                                             s.head_update.norm(dim=-1).tolist())]) + image(img["contributions"])),
        (f"5. The cost: {len(s.queries)} × {len(s.keys)} = {s.cells} scores per head and layer",
         "<p>Twice the sentence, four times the grid: the cost is quadratic in the length.</p>"),
        ("6. Self- or cross-attention", f"<p>This is <b>{s.kind}</b> attention: queries from the "
         f"{'source' if s.kind == 'encoder' else 'target'}, keys and values from the "
         f"{'target prefix' if s.kind == 'decoder' else 'source'}.</p>"),
        ("7. Many heads in parallel", "".join(image(img[f"head{h.head}"]) for h in heads)),
        ("What the model predicts next", table(["predicting", "top next pieces"],
                                               [[t, "  ".join(f"{p} {q:.2f}" for p, q in top)]
                                                for t, top in zip(targets, predictions)])),
        ("Which heads matter: switched off one at a time", image(img["importance"]) + table(
            ["switched off", "mean drop in log P(reference)"], [[labels[i], float(drops[i].mean())] for i in worst])),
    ]
    body = "".join(f"<h2>{html.escape(title)}</h2>{content}" for title, content in sections)
    write_text(out / "explain.html", f"""<!doctype html><html><head><meta charset="utf-8">
<title>attention, step by step</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}img{{max-width:100%}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px}}</style></head><body>
<h1>Attention, step by step: {html.escape(s.kind)}, layer {s.layer}, head {s.head}</h1>{body}</body></html>
""")
