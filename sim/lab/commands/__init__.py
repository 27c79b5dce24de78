"""One module per `servesim` command: a click command that parses options and calls the lab."""
