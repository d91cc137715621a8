import sys

from fatscale.tracking.cli import main

sys.exit(main())
