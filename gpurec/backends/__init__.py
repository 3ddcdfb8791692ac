"""Backends turn a batch's records into pixels: DALI (GPU or CPU mode) and OpenCV (CPU)."""
