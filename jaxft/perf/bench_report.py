"""`jaxft bench`'s report as Markdown: a table per length with each compared library's beside it,
then tokens/s at the longest length relative to the shortest."""

from __future__ import annotations

# Each jaxft kind against the step another library's loop would run for it: DPO with a
# precomputed reference is compared with their DPO step with its reference forward; both SFT
# kinds with their SFT step (whole logits, as plain transformers computes them).
VERSUS = {"sft": "sft", "sft_full_logits": "sft", "dpo": "dpo_reference", "dpo_reference": "dpo_reference"}
LIBRARY_NAMES = {"torch": "PyTorch", "tunix": "Tunix"}


_LABELS = {"sft": "sft", "sft_full_logits": "sft_full_logits (whole logits)", "dpo": "dpo (precomputed reference)",
           "dpo_reference": "dpo_reference (reference forward)", "sft_lora": "sft_lora (LoRA, frozen base)",
           "dpo_lora": "dpo_lora (LoRA, reference = adapters off)"}


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f}"


def format_length(report: dict, length: str) -> list[str]:
    """Markdown lines of one length: jaxft's kinds, then each compared library's table."""
    row, batch = report["lengths"][length], report["batch"][length]
    out = ["", f"### {length} tokens", "",
           f"{batch['real_tokens']:,} real tokens of {batch['positions']:,} positions "
           f"({100 * batch['real_tokens'] / batch['positions']:.0f}%), {batch['trained_tokens']:,} in the loss; "
           "tokens/s counts positions", "",
           "| step | ms/step | tokens/s | x sft | MFU | first call s | peak MiB |",
           "|---|---|---|---|---|---|---|"]
    for name, r in row.items():
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        out.append(f"| {_LABELS[name]} | {1000 * r['step_time']:,.1f} | {r['tokens_per_sec']:,.0f} | "
                   f"{r['ratio_to_sft']:.2f} | {mfu} | {r['compile_s']:.1f} | {_mib(r['peak_bytes'])} |")
    if "sft_lora" in row:
        out += ["", f"LoRA: the sft_lora step takes {row['sft_lora']['ratio_to_sft']:.2f}x the full sft step "
                    f"({1 / row['sft_lora']['ratio_to_sft']:.2f}x faster); dpo_lora takes "
                    f"{row['dpo_lora']['step_time'] / row['sft_lora']['step_time']:.2f}x sft_lora"]
    for name, theirs in report["compare"].items():
        lib, theirs = LIBRARY_NAMES[name], theirs["lengths"][length]
        out += ["", f"| jaxft step | vs {lib} step | {lib} ms/step | {lib} tokens/s | jaxft tokens/s "
                    f"| jaxft / {lib} |", "|---|---|---|---|---|---|"]
        for kind, vs in VERSUS.items():
            t = theirs[vs]
            out.append(f"| {_LABELS[kind]} | {vs} | {1000 * t['step_time']:,.1f} | {t['tokens_per_sec']:,.0f} "
                       f"| {row[kind]['tokens_per_sec']:,.0f} | {theirs['ratio'][kind]:.2f}x |")
    return out


def format_bench(report: dict) -> str:
    """The report of `run_bench` as Markdown: one table per length (and each compared
    library's beside it), then tokens/s at the longest length relative to the shortest."""
    c, d = report["config"], report["device"]
    m, st = c["model"], c["settings"]
    chunk = st["loss_chunk"]
    words = {method: _chunk_words(chunk[method], st["loss_chunk_size"][method]) for method in chunk}
    loss = words["sft"] if len(set(words.values())) == 1 else " / ".join(f"{k} {v}" for k, v in words.items())
    layers = f"{m['num_layers']} layer{'s' if m['num_layers'] > 1 else ''}"
    out = [f"{c['preset']} ({m['num_params'] / 1e6:.1f}M params, vocabulary {m['vocab_size']:,}, {layers}"
           f"{', tied embeddings' if m.get('tie_word_embeddings') else ''}), batch {c['batch_size']} rows "
           f"right-padded, {d['count']} x {d['kind']}, best of {c['rounds']} rounds",
           f"jaxft settings ({st['source']} without a preset"
           f"{'; flags set ' + ', '.join(st['overridden']) if st['overridden'] else ''}): "
           f"{st['param_dtype']} weights, {st['compute_dtype']} compute, remat {st['remat']}, "
           f"attention {st['attention']} ({st['attention_backend']}), loss: {loss}; sft_full_logits: whole logits"]
    others = {LIBRARY_NAMES[name]: theirs for name, theirs in report["compare"].items()}
    for lib, theirs in others.items():
        out.append(f"{lib}: {theirs['library']}; the same model sizes, batch, padding and loss masks")
    for length in report["lengths"]:
        out += format_length(report, length)
    if len(report["lengths"]) > 1:
        first, last = list(report["lengths"])[0], list(report["lengths"])[-1]
        out += ["", f"### tokens/s at {last} relative to {first}", "",
                f"| step | jaxft {first} | jaxft {last} | jaxft {last} / {first} |"
                + "".join(f" {lib} {last} / {first} |" for lib in others),
                "|---|---|---|---|" + "---|" * len(others)]
        for kind in report["scaling"]:
            line = (f"| {_LABELS[kind]} | {report['lengths'][first][kind]['tokens_per_sec']:,.0f} | "
                    f"{report['lengths'][last][kind]['tokens_per_sec']:,.0f} | {report['scaling'][kind]:.2f} |")
            vs = VERSUS.get(kind)
            line += "".join(f" {theirs['scaling'][vs]:.2f} ({vs}) |" if vs else " |" for theirs in others.values())
            out.append(line)
    return "\n".join(out)


def _chunk_words(chunk: int, setting: int) -> str:
    """'chunks of 512 tokens (auto)' / 'whole logits' for a resolved loss chunk and its setting."""
    if chunk == 0:
        return "whole logits"
    return f"chunks of {chunk:,} trained tokens{' (auto)' if setting < 0 else ''}"
