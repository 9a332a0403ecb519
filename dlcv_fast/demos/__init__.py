"""Demos run by ``python -m dlcv_fast``: LeNet-5 on digits (lenet.py)."""
