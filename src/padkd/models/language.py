"""Causal language models from Hugging Face `transformers`: GPT-2-style and Llama-style ones built from a
small config, or any causal LM loaded from a local `save_pretrained` directory (never downloaded).

The factories return the `transformers` model itself, so state-dict keys are those of `transformers` (a
padkd export loads into `AutoModelForCausalLM` after `save_pretrained` of a config with the same shape).
The `language_modeling` task calls them as `model(input_ids=..., attention_mask=...)` and reads `.logits`.
Tap aliases (`padkd_taps`): `block{k}` (the hidden state after block k, `[B, T, D]`), `final_norm` (the
final layer norm's output, what the LM head reads) and `logits` (the LM head's output, `[B, T, V]`).
Every factory takes `vocab_size` from the data (its tokenizer); a model whose vocabulary differs is an error,
so teacher and student always share one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from torch import nn

from padkd.errors import PadkdError
from padkd.models import MODELS


def _transformers():  # type: ignore[no-untyped-def]
    try:
        import transformers
    except ImportError:
        raise PadkdError("model: the language models need transformers; pip install 'padkd[language]'") from None
    return transformers


def _blocks_and_norm(model: nn.Module) -> tuple[str, int, str]:
    """Module paths of the decoder blocks' list and of the final norm, and the number of blocks."""
    names = dict(model.named_modules())
    for blocks, norm in (("transformer.h", "transformer.ln_f"), ("model.layers", "model.norm"),
                         ("gpt_neox.layers", "gpt_neox.final_layer_norm"), ("model.decoder.layers",
                                                                             "model.decoder.final_layer_norm")):
        if blocks in names and norm in names:
            return blocks, len(names[blocks]), norm  # type: ignore[arg-type]
    raise PadkdError(f"model: {type(model).__name__} has no known block list (transformer.h, model.layers, ...); "
                     "tap its modules by path instead of the block/final_norm aliases")


def prepare_causal_lm(model: nn.Module, vocab_size: int, where: str) -> nn.Module:
    """Check the model's vocabulary against the data's and give it padkd's tap aliases."""
    have = int(model.get_output_embeddings().weight.shape[0])  # type: ignore[operator,union-attr]
    if have != vocab_size:
        raise PadkdError(f"{where}: the model's vocabulary has {have} tokens but the data's tokenizer has "
                         f"{vocab_size}; teacher, student and tokenizer must share one vocabulary (use the "
                         "model's own tokenizer directory in data.tokenizer)")
    blocks, count, norm = _blocks_and_norm(model)
    head = next(name for name, m in model.named_modules() if m is model.get_output_embeddings())  # type: ignore
    taps = {f"block{k}": f"{blocks}.{k}" for k in range(count)} | {"final_norm": norm, "logits": head}
    model.padkd_taps = taps  # type: ignore[assignment]
    return model


@MODELS.register("gpt2")
def gpt2(vocab_size: int, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 256,
         dropout: float = 0.0) -> nn.Module:
    """A GPT-2-style causal LM built from its config (learned positions, LayerNorm, GELU MLP, tied head)."""
    tf = _transformers()
    if min(n_layer, n_embd, n_head, n_positions) < 1 or n_embd % n_head:
        raise PadkdError(f"model: gpt2 needs positive sizes with n_embd divisible by n_head, got n_layer={n_layer}, "
                         f"n_embd={n_embd}, n_head={n_head}, n_positions={n_positions}")
    config = tf.GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                           n_positions=n_positions, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                           bos_token_id=None, eos_token_id=None)
    return prepare_causal_lm(tf.GPT2LMHeadModel(config), vocab_size, "model")


@MODELS.register("llama")
def llama(vocab_size: int, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_kv_head: int | None = None,
          intermediate_size: int | None = None, n_positions: int = 256, tie_embeddings: bool = True) -> nn.Module:
    """A Llama-style causal LM built from its config (RoPE, RMSNorm, SwiGLU MLP, grouped-query attention)."""
    tf = _transformers()
    kv = n_kv_head or n_head
    if min(n_layer, n_embd, n_head, n_positions, kv) < 1 or n_embd % n_head or n_head % kv:
        raise PadkdError(f"model: llama needs positive sizes, n_embd divisible by n_head and n_head by n_kv_head, "
                         f"got n_embd={n_embd}, n_head={n_head}, n_kv_head={kv}")
    config = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=n_embd, num_hidden_layers=n_layer,
                            num_attention_heads=n_head, num_key_value_heads=kv,
                            intermediate_size=intermediate_size or 4 * n_embd, max_position_embeddings=n_positions,
                            tie_word_embeddings=tie_embeddings, bos_token_id=None, eos_token_id=None,
                            pad_token_id=None)
    return prepare_causal_lm(tf.LlamaForCausalLM(config), vocab_size, "model")


@MODELS.register("hf_causal_lm")
def hf_causal_lm(vocab_size: int, path: str, dtype: Literal["float32", "bfloat16", "float16"] = "float32"
                 ) -> nn.Module:
    """Any causal LM from a local `save_pretrained` directory (config + safetensors), never downloaded."""
    tf = _transformers()
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise PadkdError(f"model.path: '{path}' holds no config.json; give a folder written by save_pretrained")
    tf.utils.logging.disable_progress_bar()  # padkd's own output stays one line per event
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise PadkdError(f"model.path: cannot load a causal LM from '{path}': {first}") from None
    return prepare_causal_lm(model, vocab_size, "model")
