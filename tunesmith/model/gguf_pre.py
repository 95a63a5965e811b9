"""llama.cpp's name for how a BPE tokenizer splits text before merging ("tokenizer.ggml.pre").

llama.cpp's converter recognises a tokenizer by hashing how it splits a test string; a fine-tune
keeps its base's tokenizer, so this answer only matters when that hash is unknown (a base shipped
as GGUF, a small test tokenizer): then the base GGUF's own name is used, else the known split
pattern this tokenizer uses, else GPT-2's.
"""

from __future__ import annotations

import json
from pathlib import Path


def pre_tokenizer_name(tokenizer, base_spec: str | None) -> str:
    from tunesmith.model.load import ALIASES, _alias_file

    path = _alias_file(base_spec) if base_spec in ALIASES else Path(base_spec) if base_spec else None
    if path is not None and path.suffix == ".gguf" and path.is_file():
        import gguf

        field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return bytes(field.parts[field.data[0]]).decode()
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return "gpt-2"
    if not hasattr(tokenizer, "backend_tokenizer"):
        return "gpt-2"
    spec = json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer"))
    for name, pattern in GGUF_PRE_TOKENIZER_SPLITS.items():
        if json.dumps(pattern)[1:-1] in spec:
            return name
    return "gpt-2"
