"""Training: `kvshift train | compare | plot` (cli.py), the loop (trainer.py), checkpoints, DDP/FSDP2,
optimizer and schedule, FLOP accounting. Importing this package imports nothing heavy; the CLI
imports torch only when a command runs."""
