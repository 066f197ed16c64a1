"""`python -m dpokit` runs the command line, so `accelerate launch -m dpokit` and `torchrun -m dpokit` work."""

from dpokit.cli import run

if __name__ == "__main__":
    run()
