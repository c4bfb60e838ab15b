"""`python -m deltacli` (and `accelerate launch -m deltacli train ...`)."""

from deltacli.cli import main

main()
