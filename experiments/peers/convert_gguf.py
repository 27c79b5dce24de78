"""Run llama.cpp's vendored convert_hf_to_gguf.py on an export_checkpoint.py checkpoint.

    CONVERT_VENV/bin/python convert_gguf.py LLAMA_CPP_SRC HF_DIR [converter options...]

Runs in llama.cpp's converter venv (llamacpp.sh setup makes it), not the project's. The
converter takes the checkpoint as it is except for two things that our byte-level tokenizer
(BPE without merges) trips over, patched here rather than by editing the vendored tree:

1. It recognises a BPE pre-tokenizer by hashing the ids of a fixed test string against a list
   of known models and refuses unknown ones. Ours is unknown, so it is written as "default".
   Without merges every byte is its own token whatever the pre-tokenizer splits, so the choice
   does not change a single id.
2. llama.cpp refuses a "gpt2" (BPE) vocabulary without merges at load time. One merge is
   written that valid UTF-8 never triggers: two 0xC0 bytes (0xC0 never occurs in UTF-8); even
   if it fired, its result is not in the vocabulary and llama.cpp falls back to the bytes.
"""
import sys
from pathlib import Path

src, argv = Path(sys.argv[1]), sys.argv[2:]
sys.path.insert(0, str(src))
sys.path.insert(1, str(src / "gguf-py"))

import gguf  # noqa: E402
import convert_hf_to_gguf  # noqa: E402
from conversion import base  # noqa: E402

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"

_add_to_gguf = gguf.SpecialVocab.add_to_gguf


def add_to_gguf(self, gw, quiet=False):
    if self.load_merges and not self.merges:
        self.merges = ["\u00c0 \u00c0"]  # byte 0xC0 twice, as GPT-2's byte-to-unicode table writes it
    return _add_to_gguf(self, gw, quiet)


gguf.SpecialVocab.add_to_gguf = add_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *argv]
convert_hf_to_gguf.main()
