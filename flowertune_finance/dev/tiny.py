"""A deterministic tiny causal LM with its own tokenizer, for smoke runs and tests offline.

The real app loads `mistralai/Mistral-7B-v0.3` from the hub; here we build a model of the
same family (Mistral by default, Llama or Qwen2 on request) with a few thousand weights
and a byte-level BPE tokenizer trained in-process on synthetic finance text. It is saved
with `save_pretrained`, so the app loads it through exactly the same
`AutoModelForCausalLM.from_pretrained(folder)` path as a downloaded model.
"""

from __future__ import annotations

from pathlib import Path

from flowertune_finance.dev import synthetic

ARCHITECTURES = ("mistral", "llama", "qwen2")
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def _training_corpus() -> list[str]:
    """Text the tokenizer is trained on: sentences, instructions and both prompt formats."""
    from flowertune_finance.prompts import format_prompt

    texts = [text for text, _ in synthetic.sentences(600, seed=7)]
    texts += [text for text, _ in synthetic.sentences(200, seed=8, companies=synthetic.HELD_OUT_COMPANIES)]
    for instruction in (synthetic.INSTRUCTION_NEWS, synthetic.INSTRUCTION_TWEET, synthetic.INSTRUCTION_GRADED):
        for prompt_format in ("alpaca", "answer"):
            texts.append(format_prompt(instruction, "Alder Corp posted strong sales.", prompt_format))
    texts += [label for grades in synthetic.GRADES.values() for label in grades] * 20
    return texts


def build_tokenizer(vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer that, like Mistral's, prepends BOS and has no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    # left padding, as batched generation with a decoder-only model expects
    # (the official evaluation pads on the tokenizer's own side)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, padding_side="left", **SPECIAL_TOKENS)


def build_tiny_model(
    output_dir: str | Path,
    architecture: str = "mistral",
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a random-weight causal LM and its tokenizer to `output_dir`; return the folder.

    The same arguments always give the same weights and vocabulary.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r} is not supported; allowed: {', '.join(ARCHITECTURES)}")
    output_dir = Path(output_dir)
    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(
        architecture,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    # Some architectures' tokenizer classes add special tokens of their own on loading
    # (Qwen2 adds <|endoftext|>): size the embeddings for the tokenizer the app will load.
    config.vocab_size = max(config.vocab_size, len(AutoTokenizer.from_pretrained(output_dir)))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(output_dir)
    return output_dir
