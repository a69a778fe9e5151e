"""The project's exception tree; the CLI maps each to an exit code.

- ``DeployError``: base of everything the CLI reports as one line.
  - ``ConfigError`` (exit 2): a setting is invalid or inconsistent; nothing was started.
  - ``StartupError`` (exit 1): something started and then failed; what was started is stopped.
"""


class DeployError(Exception):
    exit_code = 1


class ConfigError(DeployError):
    exit_code = 2


class StartupError(DeployError):
    exit_code = 1
