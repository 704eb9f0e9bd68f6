"""The training system: AGC, optimizer, loader, trainer, scaling fits."""
