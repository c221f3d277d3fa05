"""`run.py export`: a checkpoint as a model directory for the runtimes people deploy.

format=ctranslate2 builds CTranslate2's TransformerSpec through its own spec API (the converters'
building blocks) and saves it with the SentencePiece model beside it. Our layers map one to one:
fused query/key/value for self-attention, query + fused key/value for cross-attention, LayerNorms per
sublayer (before it, or after it for a post-norm model), a final LayerNorm per stack (pre-norm),
embeddings scaled by sqrt(d_model) plus our sinusoidal table, and the output projection tied to the
embedding.

format=huggingface writes a transformers MarianMTModel with its MarianTokenizer files. Marian is the
paper's post-norm Transformer, so only post-norm models (model.pre_norm=false) fit it. Its sinusoidal
table puts all the sines before all the cosines where ours interleaves them, so every vector of the
residual stream is stored with its features in that order (`marian_order`); attention heads, scores
and outputs are unchanged by it.
"""
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from seq2seq import Seq2SeqError
from seq2seq.checkpoint import load_model
from seq2seq.files import write_text


def set_linear(spec, weight, bias=None) -> None:
    spec.weight = weight.detach().float().numpy()
    if bias is not None:
        spec.bias = bias.detach().float().numpy()


def stacked_qkv(attn) -> tuple:
    """CTranslate2's fused self-attention projection: W_Q over W_K, W_V (and their biases)."""
    return (torch.cat([attn.q_proj.weight, attn.kv_proj.weight]), torch.cat([attn.q_proj.bias, attn.kv_proj.bias]))


def set_norm(spec, norm) -> None:
    spec.gamma, spec.beta = norm.weight.detach().numpy(), norm.bias.detach().numpy()


def set_stack_common(spec, model) -> None:
    embeddings = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings  # encoder: a list
    embeddings.weight = model.embed.weight.detach().numpy()
    spec.scale_embeddings = math.sqrt(model.cfg.d_model)
    spec.position_encodings.encodings = model.positions.numpy()


def export_ctranslate2(ckpt: str, out_dir: str) -> None:
    """A CTranslate2 model directory (model.bin, vocabularies) plus the SentencePiece model (spm.model) and
    what `translate backend=ctranslate2` needs to prepare text as ours does (seq2seq.json: TextInfo, max_len)."""
    from ctranslate2.specs import common_spec, transformer_spec

    model, tokenizer, info = load_model(ckpt)
    cfg = model.cfg
    spec = transformer_spec.TransformerSpec.from_config((cfg.n_enc_layers, cfg.n_dec_layers), cfg.n_heads,
                                                        pre_norm=cfg.pre_norm, activation=common_spec.Activation.RELU)
    set_stack_common(spec.encoder, model)
    if cfg.pre_norm:
        set_norm(spec.encoder.layer_norm, model.encoder_norm)
    for layer_spec, layer in zip(spec.encoder.layer, model.encoder_layers):
        set_linear(layer_spec.self_attention.linear[0], *stacked_qkv(layer.self_attn))
        set_linear(layer_spec.self_attention.linear[1], layer.self_attn.out_proj.weight, layer.self_attn.out_proj.bias)
        set_norm(layer_spec.self_attention.layer_norm, layer.sublayers[0].norm)
        set_linear(layer_spec.ffn.linear_0, layer.ffn[0].weight, layer.ffn[0].bias)
        set_linear(layer_spec.ffn.linear_1, layer.ffn[2].weight, layer.ffn[2].bias)
        set_norm(layer_spec.ffn.layer_norm, layer.sublayers[1].norm)
    set_stack_common(spec.decoder, model)
    if cfg.pre_norm:
        set_norm(spec.decoder.layer_norm, model.decoder_norm)
    set_linear(spec.decoder.projection, model.embed.weight)
    for layer_spec, layer in zip(spec.decoder.layer, model.decoder_layers):
        attn, cross = layer.self_attn, layer.cross_attn
        set_linear(layer_spec.self_attention.linear[0], *stacked_qkv(attn))
        set_linear(layer_spec.self_attention.linear[1], attn.out_proj.weight, attn.out_proj.bias)
        set_norm(layer_spec.self_attention.layer_norm, layer.sublayers[0].norm)
        set_linear(layer_spec.attention.linear[0], cross.q_proj.weight, cross.q_proj.bias)  # W_Q
        set_linear(layer_spec.attention.linear[1], cross.kv_proj.weight, cross.kv_proj.bias)  # W_K, W_V
        set_linear(layer_spec.attention.linear[2], cross.out_proj.weight, cross.out_proj.bias)
        set_norm(layer_spec.attention.layer_norm, layer.sublayers[1].norm)
        set_linear(layer_spec.ffn.linear_0, layer.ffn[0].weight, layer.ffn[0].bias)
        set_linear(layer_spec.ffn.linear_1, layer.ffn[2].weight, layer.ffn[2].bias)
        set_norm(layer_spec.ffn.layer_norm, layer.sublayers[2].norm)
    pieces = tokenizer.pieces(list(range(tokenizer.vocab_size)))
    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    spec.config.bos_token, spec.config.eos_token = pieces[tokenizer.bos_id], pieces[tokenizer.eos_id]
    spec.config.unk_token, spec.config.decoder_start_token = pieces[tokenizer.unk_id], pieces[tokenizer.bos_id]
    spec.validate()
    spec.optimize(quantization=None)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    spec.save(out_dir)
    (Path(out_dir) / "spm.model").write_bytes(tokenizer.model_proto)
    write_text_info(out_dir, info, cfg.max_len)


def write_text_info(out_dir: str, info, max_len: int) -> None:
    """seq2seq.json: how the training text was prepared (TextInfo), which the exported model expects too."""
    write_text(Path(out_dir) / "seq2seq.json", json.dumps({"text_info": asdict(info), "max_len": max_len}) + "\n")


def marian_order(d_model: int) -> torch.Tensor:
    """Feature i of a Marian residual vector is our feature marian_order[i]: our sinusoidal table has
    sin, cos, sin, cos, ... (the paper's PE[pos, 2i], PE[pos, 2i+1]); Marian's has all sines, then all cosines."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def marian_state_dict(model) -> dict:
    """Our weights under MarianMTModel's names, reordered to Marian's residual features (`marian_order`).

    A weight that reads the residual stream has its input columns reordered, one that writes it (W_O, W2,
    LayerNorm) its output rows; W_K and W_V come out of our stacked kv_proj."""
    order = marian_order(model.cfg.d_model)
    D = model.cfg.d_model

    def reads(w):  # (out, D): columns in Marian's order
        return w[:, order]

    def writes(w):  # (D, ...) rows in Marian's order
        return w[order]

    def attention(prefix, attn):
        (w_k, w_v), (b_k, b_v) = attn.kv_proj.weight.split(D), attn.kv_proj.bias.split(D)
        return {f"{prefix}.q_proj.weight": reads(attn.q_proj.weight), f"{prefix}.q_proj.bias": attn.q_proj.bias,
                f"{prefix}.k_proj.weight": reads(w_k), f"{prefix}.k_proj.bias": b_k,
                f"{prefix}.v_proj.weight": reads(w_v), f"{prefix}.v_proj.bias": b_v,
                f"{prefix}.out_proj.weight": writes(attn.out_proj.weight),
                f"{prefix}.out_proj.bias": writes(attn.out_proj.bias)}

    def norm(prefix, ln):
        return {f"{prefix}.weight": writes(ln.weight), f"{prefix}.bias": writes(ln.bias)}

    def ffn(prefix, ffn):
        return {f"{prefix}.fc1.weight": reads(ffn[0].weight), f"{prefix}.fc1.bias": ffn[0].bias,
                f"{prefix}.fc2.weight": writes(ffn[2].weight), f"{prefix}.fc2.bias": writes(ffn[2].bias)}

    embed = reads(model.embed.weight)  # (V, D)
    state = {"model.shared.weight": embed, "model.encoder.embed_tokens.weight": embed,
             "model.decoder.embed_tokens.weight": embed, "lm_head.weight": embed,
             "final_logits_bias": torch.zeros(1, model.cfg.vocab_size)}
    for i, layer in enumerate(model.encoder_layers):
        p = f"model.encoder.layers.{i}"
        state |= attention(f"{p}.self_attn", layer.self_attn)
        state |= norm(f"{p}.self_attn_layer_norm", layer.sublayers[0].norm)
        state |= ffn(p, layer.ffn) | norm(f"{p}.final_layer_norm", layer.sublayers[1].norm)
    for i, layer in enumerate(model.decoder_layers):
        p = f"model.decoder.layers.{i}"
        state |= attention(f"{p}.self_attn", layer.self_attn)
        state |= norm(f"{p}.self_attn_layer_norm", layer.sublayers[0].norm)
        state |= attention(f"{p}.encoder_attn", layer.cross_attn)
        state |= norm(f"{p}.encoder_attn_layer_norm", layer.sublayers[1].norm)
        state |= ffn(p, layer.ffn) | norm(f"{p}.final_layer_norm", layer.sublayers[2].norm)
    return {name: w.detach().float().contiguous() for name, w in state.items()}


def to_marian(model, tokenizer):
    """Our post-norm Transformer as a transformers MarianMTModel (eval mode) that computes the same logits."""
    from transformers import GenerationConfig, MarianConfig, MarianMTModel

    cfg = model.cfg
    if cfg.pre_norm:
        raise Seq2SeqError("a pre-norm model: Hugging Face's MarianMTModel is post-norm only; train with "
                           "model.pre_norm=false to export format=huggingface, or use format=ctranslate2")
    special = dict(pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
                   decoder_start_token_id=tokenizer.bos_id, forced_eos_token_id=tokenizer.eos_id)
    config = MarianConfig(vocab_size=cfg.vocab_size, d_model=cfg.d_model, encoder_layers=cfg.n_enc_layers,
                          decoder_layers=cfg.n_dec_layers, encoder_attention_heads=cfg.n_heads,
                          decoder_attention_heads=cfg.n_heads, encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff,
                          activation_function="relu", dropout=cfg.dropout, attention_dropout=0.0,
                          activation_dropout=0.0, max_position_embeddings=cfg.max_len, scale_embedding=True,
                          share_encoder_decoder_embeddings=True, tie_word_embeddings=True, **special)
    marian = MarianMTModel(config).eval()
    missing, unexpected = marian.load_state_dict(marian_state_dict(model), strict=False)
    left = [name for name in missing if "embed_positions" not in name]  # Marian computes its sinusoid table
    if left or unexpected:
        raise Seq2SeqError(f"the Marian mapping is out of date: missing {left}, unexpected {unexpected}")
    # max_length counts the start token: bos + max_len - 1 tokens + eos, as far as our position table reaches
    marian.generation_config = GenerationConfig(max_length=cfg.max_len + 1, num_beams=1, **special)
    return marian


def export_huggingface(ckpt: str, out_dir: str) -> None:
    """A MarianMTModel directory (config, weights, generation config) with the MarianTokenizer files
    (source.spm = target.spm = our SentencePiece model, vocab.json) and seq2seq.json."""
    from transformers import MarianTokenizer

    model, tokenizer, info = load_model(ckpt)
    try:
        marian = to_marian(model, tokenizer)
    except Seq2SeqError as e:
        raise Seq2SeqError(f"{ckpt}: {e}") from None
    out = Path(out_dir)
    marian.save_pretrained(out)
    for name in ("source.spm", "target.spm"):
        (out / name).write_bytes(tokenizer.model_proto)
    vocab = {piece: i for i, piece in enumerate(tokenizer.pieces(list(range(tokenizer.vocab_size))))}
    write_text(out / "vocab.json", json.dumps(vocab, ensure_ascii=False) + "\n")
    MarianTokenizer(str(out / "source.spm"), str(out / "target.spm"), str(out / "vocab.json"),
                    model_max_length=model.cfg.max_len).save_pretrained(out)
    write_text_info(out_dir, info, model.cfg.max_len)


def export(cfg) -> None:
    from seq2seq.config import check_choice

    check_choice("format", cfg.format, ("ctranslate2", "huggingface"))
    if Path(str(cfg.output)).exists() and any(Path(str(cfg.output)).iterdir()):
        raise Seq2SeqError(f"{cfg.output}: exists and is not empty; choose a new directory")
    if cfg.format == "ctranslate2":
        write, package = export_ctranslate2, "ctranslate2"
        what = "CTranslate2 model (model.bin, vocabularies), spm.model"
    else:
        write, package, what = export_huggingface, "transformers", "MarianMTModel with its MarianTokenizer files"
    try:
        write(str(cfg.ckpt), str(cfg.output))
    except ImportError:
        raise Seq2SeqError(f"format={cfg.format} needs the {package} package: pip install -e '.[export]'") from None
    print(f"wrote {cfg.output}: {what}, seq2seq.json")
    if cfg.format == "ctranslate2":
        print(f"translate with: python run.py translate backend=ctranslate2 ckpt={cfg.output}")
