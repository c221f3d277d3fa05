"""`run.py export`: a checkpoint as a model directory for the runtimes people deploy.

format=ctranslate2 builds CTranslate2's TransformerSpec through its own spec API (the converters'
building blocks) and saves it with the SentencePiece model beside it. Our layers map one to one:
fused query/key/value for self-attention, query + fused key/value for cross-attention, pre-norm
LayerNorms per sublayer, a final LayerNorm per stack, embeddings scaled by sqrt(d_model) plus our
sinusoidal table, and the output projection tied to the embedding.
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
    if not cfg.pre_norm:
        raise Seq2SeqError(f"{ckpt}: a post-norm model; only pre-norm models export to CTranslate2")
    spec = transformer_spec.TransformerSpec.from_config((cfg.n_enc_layers, cfg.n_dec_layers), cfg.n_heads,
                                                        pre_norm=True, activation=common_spec.Activation.RELU)
    set_stack_common(spec.encoder, model)
    set_norm(spec.encoder.layer_norm, model.encoder_norm)
    for layer_spec, layer in zip(spec.encoder.layer, model.encoder_layers):
        set_linear(layer_spec.self_attention.linear[0], *stacked_qkv(layer.self_attn))
        set_linear(layer_spec.self_attention.linear[1], layer.self_attn.out_proj.weight, layer.self_attn.out_proj.bias)
        set_norm(layer_spec.self_attention.layer_norm, layer.sublayers[0].norm)
        set_linear(layer_spec.ffn.linear_0, layer.ffn[0].weight, layer.ffn[0].bias)
        set_linear(layer_spec.ffn.linear_1, layer.ffn[2].weight, layer.ffn[2].bias)
        set_norm(layer_spec.ffn.layer_norm, layer.sublayers[1].norm)
    set_stack_common(spec.decoder, model)
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
    write_text(Path(out_dir) / "seq2seq.json", json.dumps({"text_info": asdict(info), "max_len": cfg.max_len}) + "\n")


def export(cfg) -> None:
    from seq2seq.config import check_choice

    check_choice("format", cfg.format, ("ctranslate2",))
    if Path(str(cfg.output)).exists() and any(Path(str(cfg.output)).iterdir()):
        raise Seq2SeqError(f"{cfg.output}: exists and is not empty; choose a new directory")
    try:
        export_ctranslate2(str(cfg.ckpt), str(cfg.output))
    except ImportError:
        raise Seq2SeqError("format=ctranslate2 needs the ctranslate2 package: pip install -e '.[export]'") from None
    print(f"wrote {cfg.output}: CTranslate2 model (model.bin, vocabularies), spm.model, seq2seq.json; "
          f"translate with: python run.py translate backend=ctranslate2 ckpt={cfg.output}")
