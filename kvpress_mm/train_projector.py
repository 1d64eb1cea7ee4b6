"""Module entry: `python -m kvpress_mm.train_projector --steps ... --seed ...` (see kvpress_mm.training.cli)."""

from kvpress_mm.training.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
