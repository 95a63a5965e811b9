"""The command line: one table of verbs, each a module's main().

Config verbs take an optional YAML file and `--section.key value` overrides:
    tunesmith finetune run.yaml --train.max_steps 30
A user error prints one line per problem and exits with code 2; nothing half-written is left.
"""

from __future__ import annotations

import os
import sys

from tunesmith import config as config_module
from tunesmith.errors import ConfigError, TunesmithError


def _prepare(cfg):
    from tunesmith.data import prepare

    return prepare.main(cfg)


def _finetune(cfg):
    from tunesmith import finetune

    return finetune.main(cfg)


def _evaluate(cfg):
    from tunesmith.evaluate import compare

    return compare.main(cfg)


def _inspect(cfg):
    from tunesmith.data import doctor

    return doctor.main(cfg)


def _report(cfg):
    from tunesmith import report

    return report.main(cfg)


def _generate(argv):
    from tunesmith.infer import generate

    return generate.main(argv)


def _chat(argv):
    from tunesmith.infer import chat

    return chat.main(argv)


def _serve(argv):
    from tunesmith.infer import serve

    return serve.main(argv)


def _demo(argv):
    from tunesmith import demo

    return demo.main(argv)


def _merge(argv):
    from tunesmith import merge

    return merge.main(argv)


def _export(argv):
    from tunesmith import export

    return export.main(argv)


def _estimate(argv):
    from tunesmith import estimate

    return estimate.main(argv)


def _lr_find(cfg):
    from tunesmith import lrfind

    return lrfind.main(cfg)


def _sweep(argv):
    from tunesmith import sweep

    return sweep.main(argv)


def _studio(argv):
    from tunesmith.studio import command

    return command.main(argv)


# verb → (entry point, takes a config?, one-line description)
VERBS = {
    "prepare": (_prepare, True, "clean, split, template and tokenize the data into <run>/data"),
    "inspect": (_inspect, True, "the data doctor: counts, cleaning, lengths, leakage, a verdict"),
    "finetune": (_finetune, True, "train (LoRA, QLoRA, DoRA, prompt adapters, full; DPO/ORPO/SimPO/KTO); checkpoints, metrics, curves"),
    "evaluate": (_evaluate, True, ("base vs fine-tuned on held-out rows: loss, exact match, F1, BLEU, "
                                   "ROUGE, error analysis; --tasks (lm-eval benchmarks), --bias (bias probe)")),
    "lr-find": (_lr_find, True, "the learning-rate range test: loss vs rate, a pick, plots/lr_find.png"),
    "sweep": (_sweep, False, "hyperparameter search (Optuna): one finetune run per trial, pruning, best.yaml"),
    "report": (_report, True, "one self-contained report.html: config, data, curves, diagnosis, evaluation"),
    "generate": (_generate, False, "answer a prompt with a base model or a fine-tuned run"),
    "chat": (_chat, False, "talk to a base model, a fine-tuned run or a merged model in the terminal"),
    "serve": (_serve, False, "an OpenAI-compatible HTTP server for a base model and its adapters"),
    "merge": (_merge, False, "fold a LoRA/DoRA/QLoRA adapter into the base: a plain HF model directory"),
    "export": (_export, False, "write the fine-tuned model as GGUF (f16, q8_0), checked by reloading it"),
    "estimate": (_estimate, False, "memory by component, FLOPs, and the micro batch that fits, without weights"),
    "studio": (_studio, False, "the whole job in a browser: runs and live curves, new run, compare, chat, ship"),
    "demo": (_demo, False, "the built-in end-to-end demo: evaluate, fine-tune, evaluate again"),
}


# Short flags a verb accepts for its most used keys: `evaluate --tasks arc_easy --bias`.
SHORT_FLAGS = {"evaluate": {"--tasks": "--eval.tasks", "--bias": "--eval.bias"}}


def _long_flag(verb: str, arg: str) -> str:
    flag, equals, value = arg.partition("=")
    return SHORT_FLAGS.get(verb, {}).get(flag, flag) + equals + value


def usage() -> str:
    lines = ["usage: tunesmith VERB [CONFIG] [--section.key value ...]", "", "verbs:"]
    lines += [f"  {name:9} {doc}" for name, (_, _, doc) in VERBS.items()]
    lines += ["", "`tunesmith VERB --help` lists every config key with its default and meaning."]
    return "\n".join(lines)


def config_help(verb: str) -> str:
    lines = [f"usage: tunesmith {verb} [CONFIG.yaml | RUN_DIR] [--section.key value ...]", "",
             VERBS[verb][2], "", *config_module.keys_help()]
    for short, long in SHORT_FLAGS.get(verb, {}).items():
        lines.append(f"  {short:34} short for {long}")
    return "\n".join(lines)


load_config = config_module.from_args  # [CONFIG | RUN_DIR] then --section.key overrides


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        import difflib

        close = difflib.get_close_matches(verb, VERBS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown verb {verb!r}{hint}; verbs: {', '.join(VERBS)}")
    entry, takes_config, _ = VERBS[verb]
    if not takes_config:
        return entry(rest)
    rest = [_long_flag(verb, arg) for arg in rest]
    if "-h" in rest or "--help" in rest:
        print(config_help(verb))
        return 0
    return entry(load_config(rest))


def quiet_libraries() -> None:
    """Our own progress bars say what is happening; the libraries' per-file bars and deprecation
    chatter only hide it."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    # PEFT imports bitsandbytes, which on a CPU with avx512_bf16 warns at import that it could not
    # fetch a 4-bit kernel from the Hugging Face hub: advice to download code at run time, for a
    # 4-bit path that a LoRA run never takes (and a QLoRA one runs without)
    import logging as std_logging

    std_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(std_logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        for problem in err.problems:
            print(f"tunesmith: config error: {problem}", file=sys.stderr)
        return 2
    except TunesmithError as err:
        if str(err):  # empty: said once already (by rank 0 of a multi-process run)
            print(f"tunesmith: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print("tunesmith: interrupted", file=sys.stderr)
        return 130
