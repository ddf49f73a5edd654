"""The GPU simulator: a pynvml drop-in driven by scripted scenarios, faults and trace replay.

It is not a sensor: it stands in for the NVIDIA driver at the ``pynvml`` module boundary, so
the real NVML sensor code runs against it (and so can CodeCarbon and Zeus, in the bench).
"""
