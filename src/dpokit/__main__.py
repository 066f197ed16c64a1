"""`python -m dpokit` runs the command line, so `accelerate launch -m dpokit` and `torchrun -m dpokit` work."""

from dpokit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
