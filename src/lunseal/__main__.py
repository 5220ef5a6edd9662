"""``python -m lunseal``: the same as the ``lunseal`` command."""

from lunseal.host.cli.main import main

main()
