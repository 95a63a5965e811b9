"""Runs one of llama.cpp's converters as a script, with two changes:
- a BPE tokenizer whose pre-tokenizer the converter does not recognise by its hash (a fine-tune's
  own or a small test tokenizer) gets the pre-tokenizer name tunesmith determined, instead of
  stopping the export;
- the model settings it reads by the names transformers 4 used (GPT-NeoX's rotary_pct, GPT-2's
  n_ctx, a top-level rope_theta) are filled in from where transformers 5 keeps them.

    python llama_cpp_entry.py CONVERTER_ROOT SCRIPT.py ARGS...

Run as a file (not `-m tunesmith...`) so that nothing imports tunesmith's own `gguf` package before
the converter's matching gguf-py is first on the path. TUNESMITH_GGUF_PRE carries the fallback name.
"""

import os
import runpy
import sys


def with_legacy_names(config: dict) -> dict:
    rope = config.get("rope_parameters") or {}
    legacy = {"rope_theta": rope.get("rope_theta"), "n_ctx": config.get("n_positions")}
    if config.get("model_type") == "gpt_neox":
        legacy["rotary_pct"] = rope.get("partial_rotary_factor", config.get("partial_rotary_factor"))
        legacy["rotary_emb_base"] = rope.get("rope_theta")
    return {**{k: v for k, v in legacy.items() if v is not None}, **config}


def unknown_split(err: Exception) -> bool:
    """The converter's way of saying it does not know a tokenizer's pre-tokenizer by its hash: a
    NotImplementedError with this message. Anything else it raises stops the export."""
    return isinstance(err, NotImplementedError) and "pre-tokenizer was not recognized" in str(err)


def main() -> None:
    root, script, *args = sys.argv[1:]
    sys.path[0] = root  # replaces this file's folder: only the converter's modules resolve from here
    sys.path.insert(1, os.path.join(root, "gguf-py"))
    from conversion.base import ModelBase, TextModel

    recognised = TextModel.get_vocab_base_pre
    read_settings = ModelBase.load_hparams

    def settings(*args, **kwargs):
        return with_legacy_names(read_settings(*args, **kwargs))

    def pre_tokenizer(self, tokenizer) -> str:
        try:
            return recognised(self, tokenizer)
        except Exception as err:
            if not unknown_split(err):
                raise
            return os.environ.get("TUNESMITH_GGUF_PRE") or "gpt-2"

    TextModel.get_vocab_base_pre = pre_tokenizer
    ModelBase.load_hparams = staticmethod(settings)
    sys.argv = [os.path.join(root, script), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
