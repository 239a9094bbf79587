"""Token-level routing pictures: each token coloured by the expert its router ranks first.

Owns reloading a finished run's user models (config.yaml + the users' checkpoints), turning a
text into token ids with the dataset's tokenizer, recording each layer's top-1 expert per token,
and writing the page (HTML), the figure (PNG, one panel per user and layer, as the paper's
Figures 2 and 14-19: orange = generalist, blue = specialist) and the numbers (routing.json).

Texts longer than the training context are cut into consecutive windows of train.seq_len
tokens, each routed with its own context, as the model saw text during training.
Knows nothing of training; the router's decision is read from the MoE layers (``keep_routing``).
"""
from __future__ import annotations

import html
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from comigs_dist import tables
from comigs_dist.analyze import AnalysisError

# the paper's colours: orange for the generalist(s), blue for the specialist(s); more experts of
# one kind get further shades of the same hue
GENERALIST_COLOURS = ("#f5a04a", "#f7c58c", "#d9771c", "#fbe0c0")
SPECIALIST_COLOURS = ("#6fa8dc", "#a9cdef", "#3d78b8", "#cfe2f3", "#1f4e8c", "#8fb9e3")


@dataclass
class Tokenizer:
    name: str
    encode: Callable[[str], list[int]]
    piece: Callable[[int], str]      # what one token looks like on its own
    joiner: str                      # shown between tokens ("" for BPE pieces, " " for ids)


def _ids_tokenizer(vocab_size: int) -> Tokenizer:
    def encode(text: str) -> list[int]:
        ids = []
        for word in text.split():
            if not re.fullmatch(r"\d+", word) or int(word) >= vocab_size:
                raise AnalysisError(f"--text: {word!r} is not a token id in 0..{vocab_size - 1}; this dataset has a "
                                    f"synthetic vocabulary, so the text file must hold whitespace-separated token ids")
            ids.append(int(word))
        return ids
    return Tokenizer("token ids", encode, str, " ")


def _named_tokenizer(name: str) -> Tokenizer:
    try:
        import tiktoken
        enc = tiktoken.get_encoding(name)
        return Tokenizer(f"tiktoken {name}", lambda t: enc.encode(t, allowed_special="all"),
                         lambda i: enc.decode_single_token_bytes(i).decode("utf-8", errors="replace"), "")
    except (ValueError, KeyError, ImportError):
        pass
    except Exception as exc:  # e.g. no network and no TIKTOKEN_CACHE_DIR
        raise AnalysisError(f"tokenizer {name!r} cannot be loaded by tiktoken ({type(exc).__name__}: {exc}); "
                            f"set TIKTOKEN_CACHE_DIR to a directory holding its files") from None
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as exc:
        raise AnalysisError(f"tokenizer {name!r} is neither a tiktoken encoding nor a loadable Hugging Face tokenizer "
                            f"({type(exc).__name__}: {exc}); pass --tokenizer with one that is") from None
    return Tokenizer(f"hf {name}", lambda t: tok.encode(t, add_special_tokens=False),
                     lambda i: tok.decode([i]), "")


def build_tokenizer(choice: str, meta: dict) -> Tokenizer:
    """'ids', a tokenizer name, or 'auto': what the dataset's meta.json says ("tokenizer" as a
    name, or as {"kind": ..., "name"/"encoding": ...}); a 50257-token vocabulary without a
    tokenizer entry is taken to be GPT-2's BPE."""
    vocab = int(meta["vocab_size"])
    if choice == "ids":
        return _ids_tokenizer(vocab)
    if choice != "auto":
        return _named_tokenizer(choice)
    entry = meta.get("tokenizer")
    if isinstance(entry, str):
        return _ids_tokenizer(vocab) if entry == "synthetic" else _named_tokenizer(entry)
    if isinstance(entry, dict):
        if entry.get("kind") == "synthetic":
            return _ids_tokenizer(vocab)
        name = entry.get("name") or entry.get("encoding")
        if name:
            return _named_tokenizer(name)
    if vocab == 50257:
        return _named_tokenizer("gpt2")
    raise AnalysisError(f"the dataset's meta.json does not name its tokenizer (vocabulary of {vocab}); pass "
                        f"--tokenizer ids (a file of token ids) or --tokenizer NAME (e.g. gpt2)")


# --------------------------------------------------------------------------------------------
# models and decisions
# --------------------------------------------------------------------------------------------

def load_run_config(run_dir: Path):
    from comigs_dist.config import load_config
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise AnalysisError(f"--run {run_dir}: {path} is missing; pass a directory written by `python -m "
                            f"comigs_dist.main`")
    return load_config(str(path), [])


def load_user_model(cfg, run_dir: Path, user: int, vocab_size: int, checkpoint_name: str = "final.pt",
                    device: str = "cpu"):
    """The user's model as it ended the run: base + adapters, trainable state from its checkpoint."""
    from comigs_dist import checkpoint
    from comigs_dist.config import inferred_n_users, resolve_users
    from comigs_dist.methods import get_method
    from comigs_dist.model import build_user_model
    path = checkpoint.user_dir(run_dir, user) / checkpoint_name
    if not path.is_file():
        raise AnalysisError(f"{path} is missing; the run saved no such checkpoint (checkpoint.final=false?) - "
                            f"pass --checkpoint with a file that exists under {path.parent}")
    params = checkpoint.load(path)["params"]
    spec = resolve_users(cfg, inferred_n_users(cfg) or user + 1)[user]
    model = build_user_model(cfg, spec, vocab_size, get_method(cfg.method).routed)
    own = model.report.params
    if set(params) != set(own):
        diff = sorted(set(params) ^ set(own))[:4]
        raise AnalysisError(f"{path} does not fit the model config.yaml builds for user {user} (e.g. {diff}); "
                            f"was config.yaml edited after the run?")
    with torch.no_grad():
        for name, p in own.items():
            if params[name].shape != p.shape:
                raise AnalysisError(f"{path}: {name} has shape {tuple(params[name].shape)}, the model "
                                    f"{tuple(p.shape)}; was config.yaml edited after the run?")
            p.copy_(params[name])
    return model.to(device).eval()


@dataclass
class LayerDecisions:
    top1: list[int]          # expert ranked first, per token
    prob: list[float]        # its router probability
    n_experts: int
    n_generalists: int

    def shares(self) -> list[float]:
        """Fraction of the tokens whose top-1 expert is j (sums to 1)."""
        counts = [0] * self.n_experts
        for j in self.top1:
            counts[j] += 1
        return [c / len(self.top1) for c in counts]


@torch.no_grad()
def route_tokens(model, ids: list[int], seq_len: int, layers: list[int], n_generalists: int,
                 device: str = "cpu") -> dict[int, LayerDecisions]:
    """Top-1 expert of every token at each requested layer (windows of seq_len tokens)."""
    moe = model.moe
    for m in moe:
        m.keep_routing = True
    out = {layer: LayerDecisions([], [], moe[layer].n_experts, n_generalists) for layer in layers}
    try:
        for start in range(0, len(ids), seq_len):
            x = torch.tensor([ids[start:start + seq_len]], dtype=torch.long, device=device)
            model.hidden(x)  # the routing decisions; the output projection is not needed
            for layer in layers:
                m, dec = moe[layer], out[layer]
                if m.router is None:
                    if m.n_experts > 1:
                        raise AnalysisError("this model has no router (every token mixes its experts uniformly): "
                                            "there is no per-token decision to colour")
                    dec.top1 += [0] * x.shape[1]      # a single expert: the generalist takes every token
                    dec.prob += [1.0] * x.shape[1]
                    continue
                r = m.last_routing
                top1 = r.indices[:, 0]                # topk sorts by logit: column 0 is the first choice
                dec.top1 += top1.tolist()
                dec.prob += r.probs.gather(1, top1[:, None])[:, 0].float().tolist()
    finally:
        for m in moe:
            m.keep_routing = False
            m.last_routing = None
    return out


def parse_indices(text: str | None, limit: int, flag: str, default: list[int]) -> list[int]:
    if text is None:
        return default
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise AnalysisError(f"{flag} ({text!r}) must be comma-separated integers, e.g. 0,5,11") from None
    bad = [v for v in values if not 0 <= v < limit]
    if bad or not values:
        raise AnalysisError(f"{flag} ({text!r}): {bad or 'nothing given'} outside 0..{limit - 1}")
    return list(dict.fromkeys(values))


# --------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------

def expert_colour(j: int, n_generalists: int) -> str:
    if j < n_generalists:
        return GENERALIST_COLOURS[j % len(GENERALIST_COLOURS)]
    return SPECIALIST_COLOURS[(j - n_generalists) % len(SPECIALIST_COLOURS)]


def expert_name(j: int, n_generalists: int) -> str:
    return f"generalist {j}" if j < n_generalists else f"specialist {j}"


def _shown(piece: str) -> str:
    """A piece as one line of visible characters (newlines and tabs as symbols)."""
    piece = piece.replace("\r\n", "\n").replace("\n", "\u21b5").replace("\t", "\u2192")
    return "".join(c if c.isprintable() or c == " " else "\ufffd" for c in piece)


def share_text(dec: LayerDecisions) -> str:
    return ", ".join(f"{expert_name(j, dec.n_generalists)} {s:.0%}" for j, s in enumerate(dec.shares()))


def write_html(path: Path, title: str, subtitle: str, texts: list[dict], tok: Tokenizer) -> None:
    css = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; } td { vertical-align: top; padding: 6px; border: 1px solid #ddd; }
.head { font-size: 0.85em; margin-bottom: 4px; } .head b { font-weight: 600; }
.text { font-family: ui-monospace, monospace; font-size: 0.85em; line-height: 1.6; max-width: 40em;
        white-space: pre-wrap; word-break: break-word; }
.tok { border-radius: 2px; } .legend span { padding: 1px 6px; margin-right: 6px; border-radius: 2px; }
"""
    out = [f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{css}</style></head><body>", f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(subtitle)}</p>"]
    legend_experts = max((d.n_experts, d.n_generalists) for t in texts for u in t["users"].values() for d in u.values())
    n_exp, n_gen = legend_experts
    out.append("<p class='legend'>" + "".join(
        f"<span style='background:{expert_colour(j, n_gen)}'>{html.escape(expert_name(j, n_gen))}</span>"
        for j in range(n_exp)) + "</p>")
    for t in texts:
        out.append(f"<h2>{html.escape(t['name'])} ({len(t['ids'])} tokens)</h2><table>")
        layers = sorted(next(iter(t["users"].values())))
        out.append("<tr><td></td>" + "".join(f"<td><b>layer {l}</b></td>" for l in layers) + "</tr>")
        for user, by_layer in t["users"].items():
            out.append(f"<tr><td><b>user {user}</b></td>")
            for layer in layers:
                dec = by_layer[layer]
                spans = []
                for i, (tid, j, p) in enumerate(zip(t["ids"], dec.top1, dec.prob)):
                    piece = html.escape(tok.piece(tid))
                    spans.append(f"<span class='tok' style='background:{expert_colour(j, dec.n_generalists)}' "
                                 f"title='token {i}: id {tid}, {expert_name(j, dec.n_generalists)}, p={p:.2f}'>"
                                 f"{piece}</span>")
                out.append(f"<td><div class='head'><b>user {user}, layer {layer}</b>: "
                           f"{html.escape(share_text(dec))}</div><div class='text'>"
                           + html.escape(tok.joiner).join(spans) + "</div></td>")
            out.append("</tr>")
        out.append("</table>")
    out.append("</body></html>")
    Path(path).write_text("\n".join(out), encoding="utf-8")


def _layout(pieces: list[str], width: int, gap: int) -> tuple[list[tuple[int, int, str]], int]:
    """(line, column, shown text) of every token when wrapped at ``width`` characters."""
    placed, line, col = [], 0, 0
    for piece in pieces:
        shown = _shown(piece)[:width] or " "
        if col and col + len(shown) > width:
            line, col = line + 1, 0
        placed.append((line, col, shown))
        col += len(shown) + gap
        if "\n" in piece:
            line, col = line + 1, 0
    return placed, line + 1


def write_png(path: Path, title: str, text: dict, tok: Tokenizer, width: int = 64) -> None:
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Patch, Rectangle
    from comigs_dist.analyze.runs import pyplot
    plt = pyplot()
    users = list(text["users"])
    layers = sorted(next(iter(text["users"].values())))
    pieces = [tok.piece(i) for i in text["ids"]]
    placed, n_lines = _layout(pieces, width, len(tok.joiner))
    rows = [[" "] * width for _ in range(n_lines)]
    for line, col, shown in placed:
        rows[line][col:col + len(shown)] = list(shown)
    rows = ["".join(r).rstrip() for r in rows]
    # laid out by hand in inches, so that a character of the monospace font is exactly one data unit
    char_in, line_in = 0.062, 0.16                               # inches per character and per line
    pad, head, top, bottom = 0.2, 0.45, 0.55, 0.35               # margins and the space of a panel's title
    panel_w, panel_h = width * char_in + 2 * pad, n_lines * line_in + head + pad
    fig_w, fig_h = panel_w * len(layers), top + panel_h * len(users) + bottom
    fig = plt.figure(figsize=(fig_w, fig_h))
    probe = fig.text(0, 0, "0" * width, family="monospace", fontsize=10)
    probe_in = probe.get_window_extent(fig.canvas.get_renderer()).width / fig.dpi
    probe.remove()
    font = 10 * width * char_in / probe_in
    for r, user in enumerate(users):
        for c, layer in enumerate(layers):
            dec = text["users"][user][layer]
            left, low = c * panel_w + pad, fig_h - top - (r + 1) * panel_h + pad
            ax = fig.add_axes((left / fig_w, low / fig_h, width * char_in / fig_w, n_lines * line_in / fig_h))
            ax.set_xlim(0, width)
            ax.set_ylim(n_lines, 0)
            ax.axis("off")
            boxes = [Rectangle((col + 0.05, line + 0.08), len(shown) - 0.1, 0.84) for line, col, shown in placed]
            ax.add_collection(PatchCollection(boxes, linewidth=0, facecolors=[expert_colour(j, dec.n_generalists)
                                                                               for j in dec.top1]))
            # one text artist per line, not per token: far fewer artists, and monospace keeps
            # every character on its box
            for line, chars in enumerate(rows):
                ax.text(0, line + 0.5, chars, family="monospace", fontsize=font, va="center", ha="left")
            ax.set_title(f"user {user}, layer {layer}\n{share_text(dec)}", fontsize=8, loc="left")
    n_exp = max(d.n_experts for u in text["users"].values() for d in u.values())
    n_gen = max(d.n_generalists for u in text["users"].values() for d in u.values())
    fig.legend(handles=[Patch(color=expert_colour(j, n_gen), label=expert_name(j, n_gen)) for j in range(n_exp)],
               loc="lower left", bbox_to_anchor=(pad / fig_w, 0.02), ncol=n_exp, fontsize=8, frameon=False)
    fig.text(pad / fig_w, 1 - 0.1 / fig_h, title, ha="left", va="top", fontsize=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glyphs the monospace font lacks are drawn as boxes
        fig.savefig(path, dpi=130)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------

def run_routing(args) -> dict:
    from comigs_dist.data import SPLITS, load_user_data, read_meta
    from comigs_dist.train import resolve_dataset
    run_dir = Path(args.run)
    cfg = load_run_config(run_dir)
    n_users = cfg.n_users or 1
    data_dir = resolve_dataset(cfg, n_users)
    meta = read_meta(data_dir)
    vocab = int(meta["vocab_size"])
    tok = build_tokenizer(args.tokenizer, meta)
    users = parse_indices(args.users, n_users, "--users", list(range(n_users)))
    if args.max_tokens < 1:
        raise AnalysisError(f"--max-tokens ({args.max_tokens}) must be >= 1")
    if not args.text and not args.from_split:
        raise AnalysisError("nothing to route: give --text FILE ... or --from-split SPLIT:USER ...")
    texts = []
    for spec in args.from_split:
        split, _, who = spec.partition(":")
        if split not in SPLITS or not who.isdigit() or int(who) >= n_users:
            raise AnalysisError(f"--from-split {spec!r} must be SPLIT:USER with SPLIT one of {', '.join(SPLITS)} "
                                f"and USER in 0..{n_users - 1}")
        data = load_user_data(data_dir, int(who), cfg.train.seq_len, verify=False)
        ids = [int(i) for i in data.split(split)[: args.max_tokens]]
        texts.append({"name": f"user {who} {split} split", "file": spec, "ids": ids,
                      "truncated": len(data.split(split)) > args.max_tokens, "users": {}})
    for f in map(Path, args.text):
        if not f.is_file():
            raise AnalysisError(f"--text {f}: no such file")
        ids = tok.encode(f.read_text(encoding="utf-8"))
        if not ids:
            raise AnalysisError(f"--text {f}: no tokens in this file")
        if max(ids) >= vocab:
            raise AnalysisError(f"--text {f}: token id {max(ids)} is outside the model's vocabulary of {vocab}; "
                                f"use the dataset's tokenizer (--tokenizer auto)")
        texts.append({"name": f.name, "file": str(f), "ids": ids[: args.max_tokens],
                      "truncated": len(ids) > args.max_tokens,
                      "users": {}})
    layers = None
    for user in users:
        model = load_user_model(cfg, run_dir, user, vocab, args.checkpoint, args.device)
        if layers is None:
            n_layers = len(model.moe)
            default = sorted({0, n_layers // 2, n_layers - 1})
            layers = parse_indices(args.layers, n_layers, "--layers", default)
        for t in texts:
            t["users"][user] = route_tokens(model, t["ids"], cfg.train.seq_len, layers, model.spec.n_generalists,
                                            args.device)
        del model
    out = Path(args.out) if args.out else run_dir / "analysis" / "routing"
    out.mkdir(parents=True, exist_ok=True)
    title = f"Top-1 expert per token: {cfg.method}, run {run_dir.resolve().name}, checkpoint {args.checkpoint}"
    subtitle = (f"Tokenizer: {tok.name}. Each token is coloured by the expert its router ranks first in that layer "
                f"(orange: generalist, blue: specialist); texts longer than {cfg.train.seq_len} tokens are routed "
                f"in windows of that length.")
    write_html(out / "routing.html", title, subtitle, texts, tok)
    pngs = []
    for i, t in enumerate(texts):
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(t["name"]).stem)
        name = "routing.png" if len(texts) == 1 else f"routing_{i}_{stem}.png"
        write_png(out / name, f"{title}\n{t['name']}", t, tok)
        pngs.append(out / name)
    record = {"run": str(run_dir), "method": cfg.method, "checkpoint": args.checkpoint, "tokenizer": tok.name,
              "texts": [{"name": t["name"], "file": t["file"], "ids": t["ids"], "truncated": t["truncated"],
                         "users": {str(u): {str(l): {"top1": d.top1, "prob": d.prob, "shares": d.shares(),
                                                       "n_generalists": d.n_generalists}
                                              for l, d in by_layer.items()} for u, by_layer in t["users"].items()}}
                        for t in texts]}
    (out / "routing.json").write_text(json.dumps(record))
    for t in texts:
        print(f"{t['name']}: {len(t['ids'])} tokens{' (truncated)' if t['truncated'] else ''}; share of tokens per "
              f"top-1 expert")
        rows = [(user, layer, share_text(dec))
                for user, by_layer in t["users"].items() for layer, dec in by_layer.items()]
        print(tables.format_table(("user", "layer", "top-1 share"), rows, ">><", indent="  "))
    print(f"wrote {out / 'routing.html'}, {', '.join(str(p) for p in pngs)} and {out / 'routing.json'}")
    return record
