"""The ``mgd`` command line: a parser per subcommand and a dispatcher, nothing else."""
