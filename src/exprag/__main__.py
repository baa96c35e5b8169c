import sys

from exprag.cli import main

sys.exit(main())
