"""``python -m mrrp_pacs`` runs the ``mrrp-pacs`` command."""

from mrrp_pacs.cli import main

main(prog_name="mrrp-pacs")
