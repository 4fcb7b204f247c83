"""``python -m vlsegkit ...``: the same command line as the ``vlsegkit`` console script."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
