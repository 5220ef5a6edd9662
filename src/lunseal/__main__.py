"""``python -m lunseal``: the same as the ``lunseal`` command."""

from lunseal.cli.main import main

main()
