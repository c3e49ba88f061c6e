"""The ``mor`` command line: one module per subcommand (``cli/<name>_cmd.py``)."""
