"""python -m fastkd.study (see fastkd.study.cli)."""
import sys

from .cli import main

sys.exit(main())
