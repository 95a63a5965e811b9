#!/usr/bin/env bash
# Run HERE (a machine with the package registries) before bench/gpu_check.sh runs on a lent GPU
# machine, which reaches no registry: downloads into .whl/ (git-ignored through .git/info/exclude)
# the wheels that machine's image lacks (its image has torch, transformers, peft, accelerate,
# triton; see the device tool's KINDS.md) and SmolLM2's tokenizer and config. About 52 MB: the
# device takes 64 MiB a call, so Unsloth (its wheel 28 MB, with xformers and diffusers besides) and
# a newer transformers (13.5 MB) do not fit next to bitsandbytes (43 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl/smollm2
WHEELS=(trl==1.16.0 datasets==5.2.0 "dill<0.4.2" "multiprocess<0.70.20" liger-kernel==0.8.5
        cut-cross-entropy==25.1.1 bitsandbytes==0.50.2 pydantic pydantic-core annotated-types
        typing-inspection gguf beautifulsoup4 soupsieve sqlparse)
PLATFORMS=()
for n in 28 27 24 17; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
# pydantic pins its pydantic-core exactly: fetch the one this pydantic names
core=$(unzip -p .whl/pydantic-[0-9]*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
rm -f .whl/pydantic_core-*.whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" --platform manylinux2014_x86_64 -d .whl "pydantic-core==$core"
# the embedded model's tokenizer and config (gpu_speed.py builds its random 1.1B model from them)
base=$(.venv/bin/python -c 'from tunesmith.model.load import resolve; print(resolve("smollm2-135m"))')
for f in "$base"/config.json "$base"/tokenizer* "$base"/special_tokens_map.json "$base"/generation_config.json; do
    [ -e "$f" ] && cp "$f" .whl/smollm2/
done
du -sh .whl && ls .whl
