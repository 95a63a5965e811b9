"""The errors a user can cause. The CLI prints them as one line and exits with code 2."""


class TunesmithError(Exception):
    """A problem the user can fix; the message says what and where, in their words."""


class ConfigError(TunesmithError):
    """A config key or value is wrong. Holds every problem found, not just the first."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class DataError(TunesmithError):
    """A data file is missing, malformed, or yields nothing to train on."""


class ModelError(TunesmithError):
    """A model spec cannot be resolved or loaded."""
