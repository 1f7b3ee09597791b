import sys

from editd.cli import main

sys.exit(main())
