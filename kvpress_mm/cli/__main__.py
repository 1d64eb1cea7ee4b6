"""`python -m kvpress_mm.cli ...`: the same as the `kvpress-mm` console script."""

from . import main

main()
