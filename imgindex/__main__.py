"""``python -m imgindex``: the same command line as the ``imgindex`` script."""

from imgindex.pipeline.cli import main

main()
