"""``python -m launch.reproduce``: see ``launch.reproduce.cli``."""
import sys

from launch.reproduce.cli import main

sys.exit(main())
