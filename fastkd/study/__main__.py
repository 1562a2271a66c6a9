"""python -m fastkd.study (see fastkd.study.cli)."""
import sys

from .cli import main

if __name__ == "__main__":  # importing the module (as the GPU check's preflight does) runs nothing
    sys.exit(main())
