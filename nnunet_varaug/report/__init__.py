"""Report: what people read — CSV tables, figures (one PNG writer), overlays, NIfTI maps and self-contained
``report.html`` pages of ``analyze`` and ``predict``.

May import: :mod:`nnunet_varaug.utilities`, :mod:`nnunet_varaug.evaluation`, :mod:`nnunet_varaug.inference`.
"""
