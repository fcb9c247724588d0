"""Synthetic documents: the pages the demo task, the parity runs and calibration draw (``render``).

Depends on Pillow only; calibration, parity and the demo use it, it uses none of them.
"""
