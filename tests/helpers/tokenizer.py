"""A real byte-level BPE tokenizer trained locally, so tests never touch the hub.

Trained in milliseconds on the small inline corpus below. Byte-level means every string
round-trips, and a multi-byte character ("世", "🎉") may be split over several tokens
whose individual decodes are partial ("\ufffd"), which is what the incremental
detokenizer must handle.

Ids: ``<|endoftext|>`` 0, ``<|im_start|>`` 1, ``<|im_end|>`` 2, then the 256 byte tokens,
then ``vocab_size - 259`` merges. ``len(tokenizer) == vocab_size`` (checked), so a model
built on it uses ``vocab_size = len(tokenizer)``.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Varied English prose, code-ish text, numbers and punctuation: enough distinct pairs
# that the trainer always finds the requested number of merges.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog did not seem to mind at all;",
    "it simply rolled over, yawned, and went back to sleep in the warm afternoon sun.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "told stories to anyone who would listen. His favourite story was about a whale that",
    "could sing, and every evening the children gathered around him to hear it again.",
    "In mathematics, a prime number is a natural number greater than 1 that is not a",
    "product of two smaller natural numbers. The first primes are 2, 3, 5, 7, 11, 13,",
    "17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89 and 97.",
    "What is 12 + 30? It is 42. What is 7 * 8? It is 56. And 100 - 1 = 99, of course!",
    "Question: where does the river go? Answer: the river flows into the ocean, then",
    "the water rises as vapour, forms clouds, and falls again as rain on the mountains.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i * 2))",
    'She said, "Let\'s meet at 9:30 tomorrow morning (or 10:00 if the train is late)."',
    "Training a language model means predicting the next token, again and again, over",
    "billions of words; reinforcement learning then rewards the answers people prefer.",
    "Email: someone@example.com - Phone: +1 (555) 012-3456 - Date: 2024-05-17 [draft]",
    "Is it true? Yes! No... maybe; well: it depends -- on the weather, the time, and you.",
    "Café, naïve, façade, résumé: héllo wörld! 世界 你好 🎉 ✓ — “quoted” ‘text’ €5 ±2°.",
]


def build_tokenizer(path: str | Path, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train the tokenizer, save it to ``path`` (loadable by AutoTokenizer), return it.

    Deterministic: the BPE trainer breaks count ties by pair id, and ids come from the
    sorted byte alphabet, so the same arguments give byte-identical files.
    """
    num_base = len(SPECIAL_TOKENS) + 256
    if vocab_size <= num_base:
        raise ValueError(f"vocab_size must exceed {num_base} (specials + 256 bytes)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,  # first, so they get ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        # Windowed decodes must concatenate to the full decode: no space clean-up.
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    if len(tokenizer) != vocab_size:
        # The corpus ran out of pairs to merge; enlarge CORPUS rather than pad the vocab.
        raise ValueError(f"trained {len(tokenizer)} tokens, wanted {vocab_size}")
    tokenizer.save_pretrained(str(path))
    return tokenizer
