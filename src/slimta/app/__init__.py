"""The slimta daemon: command line, config and the objects built from it."""
