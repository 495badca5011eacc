"""``python -m mgd``: the same as the ``mgd`` command."""

from mgd.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
