"""The `fusesnap` command line: one module per group of subcommands."""
