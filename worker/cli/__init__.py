"""The `syncworker` command line: the commands (`main`), the operator commands and `--env-file`."""
