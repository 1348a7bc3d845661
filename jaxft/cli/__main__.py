"""`python -m jaxft.cli <command> ...`: the `jaxft` command without its console script."""

from jaxft.cli import main

main()
