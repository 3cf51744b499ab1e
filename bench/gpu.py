"""What the benches need to time the cuda backend: the GPU's HBM bandwidth for the floor column
and a timer that waits for the device.

HBM_BYTES_S: peak HBM bandwidth by product name, the vendor sheets' figure (bench/README.md,
"On a GPU"). The floor of a shape is bytes / that bandwidth; a GPU not in the table prints no
floor rather than a guessed one.
"""
from __future__ import annotations

import torch

HBM_BYTES_S = {"H200": 4.8e12, "H100": 3.35e12}


def hbm_bandwidth(device: torch.device | str) -> tuple[str, float] | None:
    """(GPU name, HBM bytes/s) of a cuda device in HBM_BYTES_S, else None (also for the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bw in HBM_BYTES_S.items():
        if key in name:
            return name, bw
    return None


def sync_for(device: torch.device | str):
    """A function that waits for the device's queued work (a no-op on the CPU): a timer that does
    not call it measures the launch, not the kernel."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None
