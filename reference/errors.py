"""The one error type for bad input: it names the field and what is allowed."""


class ConfigError(ValueError):
    """Bad input. The message names the offending field, the value given and what is allowed.

    Raised before any work starts, so a user never sees a traceback from deep inside.
    """

    def __init__(self, field: str, message: str, allowed: str | None = None):
        self.field = field
        self.allowed = allowed
        text = f"{field}: {message}"
        if allowed:
            text += f" (allowed: {allowed})"
        super().__init__(text)


def require(condition: bool, field: str, message: str, allowed: str | None = None) -> None:
    """Raise ConfigError(field, message, allowed) unless condition holds."""
    if not condition:
        raise ConfigError(field, message, allowed)
