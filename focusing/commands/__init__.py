"""One module per `focusing` sub-command (discovered by `focusing.cli`)."""
