"""The one error type for bad input: it names the field and what is allowed."""
from __future__ import annotations



class ConfigError(ValueError):
    """Bad input. The message names the offending field, the value given and what is allowed.

    Raised before any work starts, so a user never sees a traceback from deep inside.
    """

    def __init__(self, field: str, message: str, allowed: str | None = None):
        self.field = field
        self.message = message
        self.allowed = allowed
        text = f"{field}: {message}"
        if allowed:
            text += f" (allowed: {allowed})"
        super().__init__(text)

    def renamed(self, field: str) -> ConfigError:
        """The same error reported under another field name (a CLI option, a full key path)."""
        return type(self)(field, self.message, self.allowed)

    def under(self, prefix: str) -> ConfigError:
        """The same error with its field inside prefix (prefix.field, or prefix alone when it has none)."""
        if not prefix:
            return self
        if not self.field:
            return self.renamed(prefix)
        return self.renamed(prefix + self.field if self.field.startswith("[") else f"{prefix}.{self.field}")



class DoesNotFit(ConfigError):
    """A well-formed configuration that its device cannot hold: what the real engine refuses at start-up
    (weights, activations or KV over the memory). A capacity planner reports such a candidate instead
    of stopping on it."""
