#!/usr/bin/env python3
"""Dump a GGUF's tokenizer metadata to JSON for textgen-dev's tests (stand-in for the Rust GGUF reader).

Usage: dump_tokdata.py MODEL.gguf OUT.json    (needs `pip install gguf`)
"""
import json
import sys

from gguf import GGUFReader


def main():
    model, out = sys.argv[1], sys.argv[2]
    r = GGUFReader(model)

    def get(name):
        f = r.fields.get(name)
        return None if f is None else f.contents()

    data = {
        "model": get("tokenizer.ggml.model"),
        "pre": get("tokenizer.ggml.pre"),
        "tokens": get("tokenizer.ggml.tokens"),
        "token_type": get("tokenizer.ggml.token_type"),
        "merges": get("tokenizer.ggml.merges"),
        "eos_id": get("tokenizer.ggml.eos_token_id"),
        "bos_id": get("tokenizer.ggml.bos_token_id"),
        "pad_id": get("tokenizer.ggml.padding_token_id"),
        "add_bos": get("tokenizer.ggml.add_bos_token"),
        "chat_template": get("tokenizer.chat_template"),
    }
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    import os

    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()
