"""Builds a tiny random-weight GPT-2 with a locally trained byte-level BPE tokenizer (tests, demo).

Nothing is downloaded: the tokenizer is trained here on the small corpus below, the weights are
random (seeded), and the folder loads with `AutoModelForCausalLM` / `AutoTokenizer` offline.

    python -m model_worker.tiny_model models/tiny-gpt2
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

BOS = "<|bos|>"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS, BOS, PAD, IM_START, IM_END)

# ChatML-like; `add_generation_prompt` opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still say a few words, even when
its weights are random and its vocabulary is tiny. This text exists only to train a tokenizer.

Once upon a time there was a little cat who lived in a house near the river. Every morning the cat
walked along the water, watched the boats, and came home for breakfast. The kitten next door
followed the cat everywhere, and the two of them became good friends.

The stock market opened higher today as investors bought shares of technology companies. Prices of
bonds fell, and the dollar was steady against the euro. Analysts said that the market would remain
volatile until the central bank announces its next decision on interest rates.

A server answers requests over a socket. It reads a request, runs the model on a graphics card, and
writes the answer back to the client. When the card runs out of memory, the server should free its
cache, report the error, and keep serving the next request instead of crashing.

Hello! How are you today? I am fine, thank you. What would you like to talk about? We could talk
about the weather, about books, about music, or about the history of computers and the people who
built them. The first computers filled whole rooms; today a phone is far more powerful.

Numbers: one, two, three, four, five, six, seven, eight, nine, ten. Colours: red, green, blue,
yellow, black, white. Days: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.
"""


def has_model(dest: Path) -> bool:
    """True when `dest` already holds a loadable model folder (config, weights and tokenizer)."""
    dest = Path(dest)
    return (
        (dest / "config.json").is_file()
        and (dest / "tokenizer.json").is_file()
        and any(dest.glob("*.safetensors"))
    )


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return tok


def build_tiny_gpt2(
    dest: Path,
    vocab_size: int = 512,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_positions: int = 256,
    seed: int = 0,
) -> Path:
    """Write a tiny GPT-2 (random weights, seeded) and its trained tokenizer to `dest`.

    The folder is assembled next to `dest` and renamed into place, so a reader never sees half a
    model. Returns `dest`.
    """
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=n_positions,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.pad_token_id,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the result is an ordinary folder
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if has_model(dest):  # another builder won the race
            return dest
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model_worker.tiny_model",
        description="Write a tiny random GPT-2 with a locally trained tokenizer (no download).",
    )
    parser.add_argument("dest", type=Path, help="output folder (left alone if it already has a model)")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-head", type=int, default=2)
    parser.add_argument("--n-positions", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not has_model(args.dest):
        build_tiny_gpt2(
            args.dest,
            vocab_size=args.vocab_size,
            n_layer=args.n_layer,
            n_embd=args.n_embd,
            n_head=args.n_head,
            n_positions=args.n_positions,
            seed=args.seed,
        )
    print(args.dest.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
