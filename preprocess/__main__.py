"""`python -m preprocess ...` is the `preprocess` console command."""
from preprocess.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
