import sys

from metacore.cli import main

sys.exit(main())
