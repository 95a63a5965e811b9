"""Models loaded from several threads of one process at once (the studio loads a run's base and
tuned sides side by side; its forms build meta models for estimates meanwhile): every load ties its
output layer, and so does every later one. transformers swaps PreTrainedModel.tie_weights (and the
init functions) for the length of a load, so unguarded concurrent loads can leave the swap in place
for good; tunesmith.model.load.LOADING lets one load run at a time."""

from __future__ import annotations

import threading

from tunesmith import estimate
from tunesmith.model.load import load_model


def test_loads_from_several_threads_at_once_leave_later_loads_whole(llama):
    errors: list[str] = []

    def load_many() -> None:
        for _ in range(8):
            try:
                model = load_model(llama)
                assert model.lm_head.weight is model.model.embed_tokens.weight
                estimate.meta_model(model.config)
            except Exception as err:  # noqa: BLE001 — collected for the assertion below
                errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=load_many) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    later = load_model(llama)  # unguarded, this failed: "Cannot copy out of meta tensor; no data!"
    assert later.lm_head.weight is later.model.embed_tokens.weight
    assert not any(p.is_meta for p in later.parameters())
