"""One module per `spo` command, named after it, each with `run(cfg) -> exit code`."""
