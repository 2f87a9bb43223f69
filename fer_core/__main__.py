"""`python -m fer_core …` (what torchrun starts: `torchrun --nproc-per-node 2 -m fer_core run R.toml`)."""

from .cli import main

main()
