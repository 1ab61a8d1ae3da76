"""Commands: one module per ``nnunet_varaug`` command, each with ``configure_parser(parser)`` and ``run(args)``;
the flags several commands share are declared once in :mod:`.flags`. Only ``nnunet_varaug.cli`` imports this
package, and only here and in ``cli.py`` is ``argparse`` used.

May import: every layer (utilities, training, evaluation, inference, launch, report, experiments).
"""
