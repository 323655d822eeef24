"""The error a user can act on, shared by the models package and every entry point."""


class UserInputError(ValueError):
    """Bad input from the user (flags, data, configuration, checkpoint): the message is one
    sentence naming the problem and the fix, shown without a traceback. util.misc exports
    this same class; entry points turn it into `error: ...`."""
