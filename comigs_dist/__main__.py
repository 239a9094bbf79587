from comigs_dist.main import main
import sys

sys.exit(main())
