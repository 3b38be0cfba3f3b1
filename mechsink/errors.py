"""One exception family, so a CLI can print a one-line message instead of a traceback."""


class MechsinkError(Exception):
    """A user-facing error whose message is one line and says what to do."""


class UnsupportedModel(MechsinkError):
    pass


class PromptError(MechsinkError):
    pass


class SiteError(MechsinkError):
    pass
