"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class BincountError(Exception):
    """A failure the user can act on; its message is the whole story, no traceback needed."""


class ConfigError(BincountError):
    """Bad configuration or command-line input."""
