"""The Optuna study of a sweep: its storage, its queue of trials, and the workers sharing it.

The budget (a grid's combinations, or `trials: N`) is queued in the study when it is created; each
worker takes the next queued trial, so workers started together (on one SQLite file, or on several
machines with one database) never run more than the budget. A trial a killed sweep left running is
queued again by `--resume`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.log import say
from tunesmith.sweep_space import Space

SETUP_WAIT_SECONDS = 120  # a worker joining a study waits this long for its creator to queue the trials


def shown(url: str) -> str:
    """A storage URL without its password, for messages and files."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not a URL sqlalchemy parses: opening the storage reports that
        return url


def _create(optuna, storage, name: str, sampler, pruner):
    """A new study, or None when another worker created it a moment ago (it is then joined)."""
    try:
        return optuna.create_study(storage=storage, study_name=name, direction="minimize", sampler=sampler,
                                   pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        return None


def make_storage(optuna, url: str, attempts: int = 3):
    import sqlalchemy

    # SQLite: a writer waits for the other workers' writes instead of failing at once.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(1, attempts + 1):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine)
        except sqlalchemy.exc.SQLAlchemyError as err:
            # Workers started at once on a new database race to create its tables; the loser finds
            # them made when it tries again.
            if attempt == attempts:
                raise TunesmithError(f"--storage {shown(url)}: cannot open it ({str(err).splitlines()[0]})") from None
            time.sleep(attempt)
        except (ImportError, ValueError) as err:  # a missing database driver, a malformed URL
            hint = "; PostgreSQL needs pip install psycopg2-binary" if url.startswith("postgres") else ""
            raise TunesmithError(f"--storage {shown(url)}: cannot open it ({err}{hint})") from None


def open_study(optuna, url: str, name: str, space: Space, resume: bool, sweep_dir: Path):
    """Create the study and queue its trials, or join it: the same study name and space file."""
    storage = make_storage(optuna, url)
    sampler, pruner = space.make_sampler(optuna), space.make_pruner(optuna)
    if name not in optuna.get_all_study_names(storage):
        if resume:
            raise TunesmithError(f"nothing to resume: no study {name!r} in {shown(url)}")
        if any(sweep_dir.glob("trial-*")):
            raise TunesmithError(f"{sweep_dir} holds trial directories of another study; "
                                 "use another out_dir for a new sweep")
        study = _create(optuna, storage, name, sampler, pruner)
        if study is not None:
            queued = queue_budget(study, space)
            budget = [f"{queued} trials" if queued else "", f"{space.minutes:g} minutes" if space.minutes else ""]
            say(f"Sweep {sweep_dir}: study {name!r} in {shown(url)}; {len(space.params)} keys, sampler "
                f"{space.sampler}, pruner {space.pruner}, budget {', '.join(filter(None, budget))}")
            return study
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    check_same_space(study, space, name)
    if resume:
        reclaim(study, optuna)
    else:
        for trial in left_running(study, optuna):
            say(f"Note: trial {trial.number} was left running by a sweep on this machine that stopped "
                "(--resume runs it again)")
    done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                         optuna.trial.TrialState.PRUNED)))
    say(f"Sweep {sweep_dir}: {'resuming' if resume else 'joining'} study {name!r} in {shown(url)} "
        f"(finished trials: {done})")
    return study


def queue_budget(study, space: Space) -> int:
    """Queue the trials of the whole study: a grid's combinations in the file's order, else `trials`
    empty trials the sampler fills in when a worker takes them. The space is recorded last: a worker
    joining waits for it, so it never finds a half-filled queue."""
    if space.sampler == "grid":
        points = space.grid()[: space.trials]
        for point in points:
            study.enqueue_trial({p.key: p.stored(point[p.key]) for p in space.params}, user_attrs={"queued": True})
        queued = len(points)
    else:
        queued = space.trials or 0
        for _ in range(queued):
            study.enqueue_trial({}, user_attrs={"queued": True})
    study.set_user_attr("space", space.fingerprint())
    return queued


def check_same_space(study, space: Space, name: str) -> None:
    deadline = time.monotonic() + SETUP_WAIT_SECONDS
    while "space" not in study.user_attrs:
        if time.monotonic() > deadline:
            raise TunesmithError(f"study {name!r} exists but its trials were never queued (its first worker "
                                 "stopped while creating it); use another --study or out_dir")
        time.sleep(0.5)
    theirs, mine = study.user_attrs["space"], json.loads(json.dumps(space.fingerprint()))
    if theirs != mine:
        changed = [key for key in mine if theirs.get(key) != mine[key]]
        raise ConfigError(f"study {name!r} was started with another search space ({', '.join(changed)} "
                          "differ); use the same space file, or a new sweep (another out_dir or --study)")


def reclaim(study, optuna) -> None:
    """--resume: trials left running by a sweep that was killed are marked failed and queued again."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    for trial in running:
        if trial.number not in retried:
            retry(study, trial.number, trial.params)
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    if running:
        say(f"Resuming: trials {', '.join(str(t.number) for t in running)} were running when the sweep "
            "stopped; they run again as new trials")


def left_running(study, optuna) -> list:
    """Trials marked running whose worker was on this machine and is gone."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    return [t for t in running if t.user_attrs.get("host") == socket.gethostname()
            and not _alive(t.user_attrs.get("pid"))]


def _alive(pid: int | None) -> bool:
    if not pid:
        return True  # unknown: assume a worker still holds it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def retry(study, number: int, params: dict) -> None:
    study.enqueue_trial(params, user_attrs={"queued": True, "retry_of": number})


def next_trial(study, space: Space, optuna):
    """The next queued trial; None when the queue is empty. With only a time budget, a new trial."""
    queued_budget = space.sampler == "grid" or space.trials is not None
    if queued_budget and not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        return None
    trial = study.ask()
    if queued_budget and not trial.user_attrs.get("queued"):
        # Another worker took the last queued trial between our look and our ask, so Optuna made a
        # new one: it is over the budget, never runs, and is left out of every table.
        trial.set_user_attr("surplus", True)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return None
    return trial
