"""`python -m dmm_wrap ...` runs the `dmm-wrap` command line."""

from .apps.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
