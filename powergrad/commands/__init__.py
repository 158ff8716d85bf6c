"""The `powergrad` command and one module per subcommand."""
