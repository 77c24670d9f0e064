"""Official CrossFlow checkpoints (.pth) -> `save_pretrained` directories: `dit` (the DiT releases and the entry
points) and `dimr` (the DiMR releases)."""
