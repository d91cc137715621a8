import sys

from benchmarks.gpu.suite import main

sys.exit(main())
