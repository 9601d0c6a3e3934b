"""``python -m imgindex``: the same command line as the ``imgindex`` script."""

from imgindex.cli import main

main()
