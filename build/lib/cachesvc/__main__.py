import sys

from cachesvc.cli import main

sys.exit(main())
