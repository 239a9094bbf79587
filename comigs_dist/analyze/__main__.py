import sys

from comigs_dist.analyze import main

sys.exit(main())
