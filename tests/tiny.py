"""A tiny random-weight Llama and a small byte-level BPE tokenizer with a ChatML template, built offline."""

from __future__ import annotations

from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Write a haiku about the sea. Waves fold into foam, salt wind combs the grey water, gulls write on the sky.",
    "How many legs does a spider have? A spider has eight legs.",
    "Explain gradient descent in one sentence. It walks downhill on the loss surface, one small step at a time.",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ? ! , . : ; ' \" ( ) [ ] { }",
    "user assistant system Hello hello yes no maybe I am not sure. Sure! Here is the answer.",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    return fast


def build_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=2,
        eos_token_id=2,
        bos_token_id=1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # larger random weights than the default init, so log-probs differ visibly between tokens
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model


def save_tiny(path: Path, seed: int = 0) -> Path:
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed=seed)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
